"""The inference step: claim a batch across studies, decode, infer, write outputs, record.

One call of :meth:`InferenceStep.run_once` handles one batch; :meth:`InferenceStep.drain`
(what the scheduler runs) writes batch n while batch n+1 is inferred. Decoding runs in
a thread pool, SEG/SR/overlay objects are built in worker processes
(`gastrolens.daemon.workers`); one bad instance fails alone with its reason and the
rest of the batch goes on. Results, outputs, deliveries and the ``done`` state of an instance commit in
one transaction, and only while this worker still holds the instance's claim, so an
instance gets exactly one set of results even when a lease expired under a slow worker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from gastrolens import metrics
from gastrolens.config import Settings
from gastrolens.daemon.workers import output_workers
from gastrolens.db import Database, audit
from gastrolens.db.queue import ClaimedInstance, claim_instances, hold_instance
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState, Outcome
from gastrolens.findings import OutputKind
from gastrolens.db.tables import Delivery, Output, Result, utcnow
from gastrolens.dicom_io.documents.outputs import WrittenOutput, write_outputs
from gastrolens.dicom_io.documents.read import decode_rgb_frames, read_dataset
from gastrolens.storage.store import Store
from gastrolens.errors import DatabaseError, GastroLensError
from gastrolens.findings import ImageFinding
from gastrolens.models import Engine, validate_image

log = logging.getLogger(__name__)


@dataclass
class _Work:
    claim: ClaimedInstance
    dataset: Dataset | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    findings: list[ImageFinding] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class BatchReport:
    claimed: int
    done: int
    failed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


class InferenceStep:
    def __init__(self, settings: Settings, db: Database, store: Store, engine: Engine, worker: str) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.engine = engine
        self.worker = worker
        self._decoders = ThreadPoolExecutor(settings.scheduler.decode_threads, thread_name_prefix="gastrolens-decode")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="gastrolens-write")
        processes = settings.scheduler.output_processes
        self._processes = min(4, (os.cpu_count() or 1) - 1) if processes is None else processes
        self._builders = self._new_builders()

    def close(self) -> None:
        self._decoders.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        if self._builders is not None:
            self._builders.shutdown(wait=True)

    def run_once(self) -> BatchReport | None:
        """Process one batch from claim to commit; None when nothing was waiting."""
        batch = self._claim_and_infer()
        return self._write_batch(*batch) if batch else None

    def drain(self, should_stop: Callable[[], bool]) -> int:
        """Run batches until the queue is empty, writing batch n while batch n+1 is inferred.

        Writing (highdicom, pydicom, the database) holds the GIL while inference mostly
        runs in torch without it, so the two overlap; at most one batch waits to be
        written. Returns how many instances were claimed.
        """
        claimed = 0
        pending: Future[BatchReport] | None = None
        try:
            while not should_stop():
                batch = self._claim_and_infer()
                if batch is None:
                    break
                claimed += len(batch[0])
                if pending is not None:
                    pending.result()
                pending = self._writer.submit(self._write_batch, *batch)
                if len(batch[0]) < self.settings.model.batch_size:
                    break
        finally:
            if pending is not None:
                pending.result()
        return claimed

    def _claim_and_infer(self) -> tuple[list[_Work], float] | None:
        with self.db.session() as session:
            claims = claim_instances(session, self.worker, self.settings.model.batch_size,
                                     self.settings.scheduler.lease_seconds)
        if not claims:
            return None
        started = time.perf_counter()
        work = list(self._decoders.map(self._decode, claims))
        self._infer([w for w in work if w.error is None])
        return work, started

    def _write_batch(self, work: list[_Work], started: float) -> BatchReport:
        # Every instance's outputs are built at once in the worker processes, then recorded in order.
        builds = {id(item): self._submit_outputs(item) for item in work if item.error is None}
        done = failed = 0
        for item in work:
            if item.error is None:
                item.error = self._record_outputs(item, builds[id(item)])
            if item.error is not None:
                self._fail(item)
                failed += 1
            else:
                done += 1
        report = BatchReport(len(work), done, failed, time.perf_counter() - started)
        metrics.observe_batch(report.seconds, report.done)
        if failed:
            metrics.observe_failure(failed)
        log.info("batch: %d instance(s), %d done, %d failed, %.2f s, %.2f images/s",
                 report.claimed, report.done, report.failed, report.seconds, report.images_per_second)
        return report

    def _decode(self, claim: ClaimedInstance) -> _Work:
        item = _Work(claim)
        try:
            item.dataset = read_dataset(self.store.absolute(claim.file_path))
            item.frames = [validate_image(frame) for frame in decode_rgb_frames(item.dataset)]
        except (GastroLensError, OSError) as exc:
            item.error = f"cannot decode: {exc}"
        except Exception as exc:  # a corrupt stream can raise anything from a decoder plugin
            item.error = f"cannot decode: {exc.__class__.__name__}: {exc}"
        return item

    def _infer(self, work: list[_Work]) -> None:
        frames = [frame for item in work for frame in item.frames]
        if not frames:
            return
        try:
            findings = self.engine.infer(frames)
        except GastroLensError as exc:  # a batch-level failure: try instance by instance
            log.warning("batch inference failed (%s); retrying instance by instance", exc)
            for item in work:
                try:
                    item.findings = self.engine.infer(item.frames)
                except GastroLensError as err:
                    item.error = f"inference failed: {err}"
            return
        position = 0
        for item in work:
            item.findings = findings[position : position + len(item.frames)]
            position += len(item.frames)

    def _output_dir(self, claim: ClaimedInstance) -> Path:
        return self.store.absolute(str(PurePosixPath("outputs", claim.study_instance_uid)))

    def _new_builders(self) -> ProcessPoolExecutor | None:
        return output_workers(self._processes) if self._processes > 0 else None

    def _replace_builders(self) -> None:
        """Start fresh workers after one died (a broken pool refuses all further work)."""
        log.warning("starting fresh output worker processes")
        if self._builders is not None:
            self._builders.shutdown(wait=False, cancel_futures=True)
        self._builders = self._new_builders()

    def _output_args(self, item: _Work) -> tuple[tuple, dict]:  # type: ignore[type-arg]
        args = (item.dataset, item.findings, self._output_dir(item.claim), self.settings.outputs)
        return args, {"frames": item.frames, "fsync": self.settings.storage.fsync}

    def _submit_outputs(self, item: _Work) -> Future[list[WrittenOutput]]:
        args, options = self._output_args(item)
        if self._builders is not None:
            try:
                return self._builders.submit(write_outputs, *args, **options)
            except BrokenProcessPool:
                self._replace_builders()
                return self._builders.submit(write_outputs, *args, **options)  # type: ignore[union-attr]
        future: Future[list[WrittenOutput]] = Future()
        try:
            future.set_result(write_outputs(*args, **options))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _built(self, item: _Work, build: Future[list[WrittenOutput]]) -> list[WrittenOutput]:
        try:
            return build.result()
        except BrokenProcessPool:
            # A worker died (killed, out of memory): not this image's fault. Build it here
            # and start fresh workers for the next batch.
            log.error("an output worker process died; building outputs of %s in the daemon", item.claim.sop_instance_uid)
            self._replace_builders()
            args, options = self._output_args(item)
            return write_outputs(*args, **options)

    def _record_outputs(self, item: _Work, build: Future[list[WrittenOutput]]) -> str | None:
        """Wait for the instance's outputs and commit everything; the failure reason, or None."""
        try:
            written = self._built(item, build)
        except GastroLensError as exc:
            return f"cannot write outputs: {exc}"
        except Exception as exc:  # a worker process that died, or an error that did not pickle
            return f"cannot write outputs: {exc.__class__.__name__}: {exc}"
        try:
            self._record(item, written)
        except DatabaseError as exc:  # this instance fails alone; the batch goes on
            return f"cannot record results: {exc}"
        return None

    def _record(self, item: _Work, written: list[WrittenOutput]) -> None:
        """Results, outputs, deliveries and the done state in one transaction, if the claim still holds."""
        claim = item.claim
        with self.db.session() as session:
            instance = hold_instance(session, claim.id, self.worker)
            if instance is None:
                log.warning("instance %s was claimed by another worker meanwhile; dropping this result",
                            claim.sop_instance_uid)
                return
            for frame_number, finding in enumerate(item.findings, start=1):
                session.add(_result_row(claim.id, frame_number, finding))
            for output in written:
                self._record_output(session, claim, output, item.findings[0].model.weights_sha256)
            instance.state = InstanceState.DONE
            instance.finished_at = utcnow()
            instance.claimed_by = instance.lease_expires_at = None
            instance.error = None
            predicted = sorted({f.predicted.value for f in item.findings})
            audit.record(session, audit.Event(
                type=AuditEventType.INSTANCE_DONE, actor=self.worker, outcome=Outcome.SUCCESS, study_uid=claim.study_instance_uid,
                series_uid=claim.series_instance_uid, sop_uid=claim.sop_instance_uid,
                detail={"instance_id": claim.id, "frames": len(item.findings), "predicted": predicted,
                 "model": item.findings[0].model.name, "model_version": item.findings[0].model.version,
                 "weights_sha256": item.findings[0].model.weights_sha256,
                 "untrained": item.findings[0].model.untrained}))

    def _record_output(self, session, claim: ClaimedInstance, written: WrittenOutput, sha256: str) -> None:  # type: ignore[no-untyped-def]
        relative = self.store.relative(written.path)
        kind = written.kind
        output = session.scalars(select(Output).where(Output.sop_instance_uid == written.sop_instance_uid)).first()
        replaced = output is not None
        if output is None:
            output = Output(kind=kind, study_id=claim.study_id, instance_id=claim.id,
                            sop_instance_uid=written.sop_instance_uid, model_sha256=sha256)
            session.add(output)
        output.series_instance_uid = written.series_instance_uid
        output.sop_class_uid = written.sop_class_uid
        output.file_path = relative
        output.instance_id = claim.id
        output.removed_at = None
        session.flush()
        queue_deliveries(session, output, self.settings)
        audit.record(session, audit.Event(
            type=AuditEventType.OUTPUT_WRITTEN, actor=self.worker, outcome=Outcome.SUCCESS, study_uid=claim.study_instance_uid,
            series_uid=written.series_instance_uid, sop_uid=written.sop_instance_uid,
            detail={"kind": kind.value, "source_sop_uid": claim.sop_instance_uid, "path": relative,
             **({"note": "replaces an earlier output with the same UID"} if replaced else {})}))

    def _fail(self, item: _Work) -> None:
        claim = item.claim
        log.error("instance %s failed: %s", claim.sop_instance_uid, item.error)
        try:
            self._record_failure(item)
        except DatabaseError as exc:  # the lease runs out and the instance is claimed again
            log.error("cannot record the failure of %s: %s", claim.sop_instance_uid, exc)

    def _record_failure(self, item: _Work) -> None:
        claim = item.claim
        with self.db.session() as session:
            instance = hold_instance(session, claim.id, self.worker)
            if instance is None:
                return
            instance.state = InstanceState.FAILED
            instance.error = item.error
            instance.finished_at = utcnow()
            instance.claimed_by = instance.lease_expires_at = None
            audit.record(session, audit.Event(
                type=AuditEventType.INSTANCE_FAILED, actor=self.worker, outcome=Outcome.FAILURE, study_uid=claim.study_instance_uid,
                series_uid=claim.series_instance_uid, sop_uid=claim.sop_instance_uid, detail={"instance_id": claim.id, "reason": item.error}))


def queue_deliveries(session, output: Output, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """One delivery per configured destination; a replaced output is sent again."""
    existing = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.output_id == output.id))}
    for destination in settings.destinations:
        delivery = existing.get(destination.name)
        if delivery is None:
            session.add(Delivery(output_id=output.id, destination=destination.name, state=DeliveryState.PENDING,
                                 attempts=0, next_attempt_at=utcnow()))
        elif delivery.state is not DeliveryState.PENDING:
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = utcnow()
            delivery.claimed_by = delivery.lease_expires_at = None


def _result_row(instance_id: int, frame_number: int, finding: ImageFinding) -> Result:
    p = finding.probabilities
    return Result(
        instance_id=instance_id, frame_number=frame_number,
        p_normal=p[0], p_pu=p[1], p_egc_hgin=p[2], p_agc=p[3], p_smt=p[4],
        predicted_class=finding.predicted.value, lesion_present=finding.lesion_present,
        lesion_area_fraction=finding.lesion_area_fraction,
        bbox=list(finding.bbox) if finding.bbox is not None else None,
        model_name=finding.model.name, model_version=finding.model.version,
        model_sha256=finding.model.weights_sha256, untrained=finding.model.untrained,
        timings=dict(finding.timings),
    )
