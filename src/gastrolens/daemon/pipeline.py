"""The inference step: claim a batch across studies, decode, infer, write outputs, record.

One call of :meth:`InferenceStep.run_once` handles one batch; :meth:`InferenceStep.drain`
(what the scheduler runs) overlaps the stages: while the engine works on batch n, batch
n+1 is claimed and decoded in worker processes sized to the cores
(`gastrolens.daemon.decoding`) and the SEG/SR/overlay objects of batch n-1 are built in
other worker processes (`gastrolens.daemon.workers`). One bad instance fails alone with
its reason and the rest of the batch goes on. A device that failed for good
(:class:`~gastrolens.errors.DeviceError`) hands its claims back and stops the step.
Results, outputs, deliveries and the ``done`` state of an instance commit in one
transaction (`db.transitions.finish_instance`), and only while this worker still holds
the instance's claim, so an instance gets exactly one set of results even when a lease
expired under a slow worker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from gastrolens import metrics
from gastrolens.config import Settings
from gastrolens.daemon.decoding import (
    Decoded,
    decode_instance,
    decode_instance_in_worker,
    decode_process_count,
    decode_workers,
)
from gastrolens.daemon.destinations import object_destination_names
from gastrolens.daemon.workers import output_workers, write_outputs_in_worker
from gastrolens.db import Database
from gastrolens.db.queue import ClaimedInstance, claim_instances
from gastrolens.db.tables import utcnow
from gastrolens.db.transitions import NewOutput, fail_instance, finish_instance, release_instances
from gastrolens.dicom_io.documents.outputs import WrittenOutputs, write_outputs
from gastrolens.errors import DatabaseError, DeviceError, GastroLensError
from gastrolens.findings import ImageFinding
from gastrolens.models import Engine, validate_image
from gastrolens.storage.store import Store

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
        self._destination_names = object_destination_names(settings)  # HL7 ones take study SRs only
        self._decode_processes = decode_process_count(settings.scheduler.decode_processes)
        self._decode_function: Callable[[Path], Decoded] = decode_instance
        self._decoders = self._new_decoders()
        self._prefetched: list[tuple[ClaimedInstance, Future[Decoded]]] | None = None
        self.device_failed: DeviceError | None = None
        """Set when the engine's device failed for good: nothing more is claimed; restart the process."""
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="gastrolens-write")
        processes = settings.scheduler.output_processes
        self._processes = min(4, (os.cpu_count() or 1) - 1) if processes is None else processes
        self._builders = self._new_builders()

    def close(self) -> None:
        self._decoders.shutdown(wait=True, cancel_futures=True)
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
        if self.device_failed is not None:
            raise self.device_failed
        claimed = 0
        pending: Future[BatchReport] | None = None
        try:
            while self._prefetched is not None or not should_stop():
                batch = self._claim_and_infer(prefetch=not should_stop())
                if batch is None:
                    break
                claimed += len(batch[0])
                if pending is not None:
                    pending.result()
                pending = self._writer.submit(self._write_batch, *batch)
                if self._prefetched is None and len(batch[0]) < self.settings.model.batch_size:
                    break
        finally:
            if pending is not None:
                pending.result()
        return claimed

    def _claim_and_infer(self, *, prefetch: bool = False) -> tuple[list[_Work], float] | None:
        """Claim (or take the prefetched batch), decode and infer one batch.

        With ``prefetch``, a full batch's successor is claimed and starts decoding in the
        worker processes before this batch goes to the engine, so decoding overlaps inference.
        """
        started = time.perf_counter()
        decoding, self._prefetched = self._prefetched or self._claim_and_decode(), None
        if decoding is None:
            return None
        work = self._collect(decoding)
        if prefetch and len(work) >= self.settings.model.batch_size:
            self._prefetched = self._claim_and_decode()
        try:
            self._infer([w for w in work if w.error is None])
        except DeviceError as exc:
            self._device_lost(exc, [w.claim for w in work])
        return work, started

    def _claim_and_decode(self) -> list[tuple[ClaimedInstance, Future[Decoded]]] | None:
        with metrics.stage_cpu(metrics.Stage.RECORD), self.db.session() as session:  # the queue's database work
            claims = claim_instances(session, self.worker, limit=self.settings.model.batch_size,
                                     lease_seconds=self.settings.scheduler.lease_seconds, now=utcnow())
        if not claims:
            return None
        return [(claim, self._decoders.submit(self._decode_function, self.store.absolute(claim.file_path)))
                for claim in claims]

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

    def _new_decoders(self) -> Executor:
        if self._decode_processes > 0:
            self._decode_function = decode_instance_in_worker
            return decode_workers(self._decode_processes)
        self._decode_function = decode_instance
        return ThreadPoolExecutor(self.settings.scheduler.decode_threads, thread_name_prefix="gastrolens-decode")

    def _collect(self, decoding: list[tuple[ClaimedInstance, Future[Decoded]]]) -> list[_Work]:
        """Wait for a batch's decoding; count its CPU time; check the frames."""
        work = []
        for claim, future in decoding:
            try:
                with metrics.stage_cpu(metrics.Stage.DECODE):  # unpickling the frames
                    decoded = future.result()
            except BrokenProcessPool:
                decoded = self._decode_alone(claim)
            metrics.add_stage_cpu(metrics.Stage.DECODE, decoded.cpu_seconds)
            work.append(self._checked(claim, decoded))
        return work

    def _decode_alone(self, claim: ClaimedInstance) -> Decoded:
        """A decode worker died (killed, or a decoder crashed): retry this instance alone
        in fresh workers; if they die on it too, it is this instance's fault."""
        for attempt in (1, 2):
            log.warning("a decode worker process died; starting fresh ones (attempt %d for %s)", attempt,
                        claim.sop_instance_uid)
            self._decoders.shutdown(wait=False, cancel_futures=True)
            self._decoders = self._new_decoders()
            try:
                return self._decoders.submit(self._decode_function, self.store.absolute(claim.file_path)).result()
            except BrokenProcessPool:
                continue
        self._decoders.shutdown(wait=False, cancel_futures=True)
        self._decoders = self._new_decoders()
        return Decoded(error="cannot decode: the decoder process died on this instance")

    @staticmethod
    def _checked(claim: ClaimedInstance, decoded: Decoded) -> _Work:
        item = _Work(claim, dataset=decoded.dataset, error=decoded.error)
        if item.error is None:
            try:
                item.frames = [validate_image(frame) for frame in decoded.frames]
            except GastroLensError as exc:
                item.error = f"cannot decode: {exc}"
        return item

    def _infer(self, work: list[_Work]) -> None:
        frames = [frame for item in work for frame in item.frames]
        if not frames:
            return
        try:
            with metrics.stage_cpu(metrics.Stage.INFER):
                findings = self.engine.infer(frames)
        except DeviceError:
            raise
        except GastroLensError as exc:  # a batch-level failure: try instance by instance
            log.warning("batch inference failed (%s); retrying instance by instance", exc)
            for item in work:
                try:
                    with metrics.stage_cpu(metrics.Stage.INFER):
                        item.findings = self.engine.infer(item.frames)
                except DeviceError:
                    raise
                except GastroLensError as err:
                    item.error = f"inference failed: {err}"
            return
        position = 0
        for item in work:
            item.findings = findings[position : position + len(item.frames)]
            position += len(item.frames)

    def _device_lost(self, exc: DeviceError, claims: list[ClaimedInstance]) -> None:
        """No image is at fault: fail none, hand every claim back, claim nothing more, raise.

        The daemon restarts (a poisoned CUDA context needs a fresh process); the released
        instances are claimed again at once instead of after their lease.
        """
        log.critical("the inference device failed; this worker stops claiming: %s", exc)
        self.device_failed = exc
        claims = claims + [claim for claim, _ in self._prefetched or []]
        self._prefetched = None
        try:
            with self.db.session() as session:
                release_instances(session, claims, worker=self.worker)
        except DatabaseError as err:  # their leases run out instead
            log.error("cannot hand back %d claim(s) after the device failed: %s", len(claims), err)
        raise exc

    def _output_dir(self, claim: ClaimedInstance) -> Path:
        return self.store.output_folder(claim.study_instance_uid)

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

    def _submit_outputs(self, item: _Work) -> Future[WrittenOutputs]:
        args, options = self._output_args(item)
        if self._builders is not None:
            try:
                return self._builders.submit(write_outputs_in_worker, *args, **options)
            except BrokenProcessPool:
                self._replace_builders()
                return self._builders.submit(write_outputs_in_worker, *args, **options)
        future: Future[WrittenOutputs] = Future()
        try:
            future.set_result(write_outputs(*args, **options))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _built(self, item: _Work, build: Future[WrittenOutputs]) -> WrittenOutputs:
        try:
            return build.result()
        except BrokenProcessPool:
            # A worker died (killed, out of memory): not this image's fault. Build it here
            # and start fresh workers for the next batch.
            log.error("an output worker process died; building outputs of %s in the daemon",
                      item.claim.sop_instance_uid)
            self._replace_builders()
            args, options = self._output_args(item)
            return write_outputs(*args, **options)

    def _record_outputs(self, item: _Work, build: Future[WrittenOutputs]) -> str | None:
        """Wait for the instance's outputs and commit everything; the failure reason, or None."""
        try:
            written = self._built(item, build)
        except GastroLensError as exc:
            return f"cannot write outputs: {exc}"
        except Exception as exc:  # a worker process that died, or an error that did not pickle
            return f"cannot write outputs: {exc.__class__.__name__}: {exc}"
        # A worker's CPU since its previous image, or this thread's inside write_outputs.
        metrics.add_stage_cpu(metrics.Stage.OUTPUTS, written.cpu_seconds)
        outputs = [NewOutput(kind=w.kind, sop_instance_uid=w.sop_instance_uid,
                             series_instance_uid=w.series_instance_uid, sop_class_uid=w.sop_class_uid,
                             file_path=self.store.relative(w.path)) for w in written]
        try:
            with metrics.stage_cpu(metrics.Stage.RECORD), self.db.session() as session:
                finished = finish_instance(session, item.claim, worker=self.worker, findings=item.findings,
                                           outputs=outputs, quirks=written.quirks,
                                           image_size=item.frames[0].shape[:2] if item.frames else None,
                                           destinations=self._destination_names, now=utcnow())
        except DatabaseError as exc:  # this instance fails alone; the batch goes on
            return f"cannot record results: {exc}"
        if not finished:
            log.warning("instance %s was claimed by another worker meanwhile; dropping this result",
                        item.claim.sop_instance_uid)
        return None

    def _fail(self, item: _Work) -> None:
        claim = item.claim
        log.error("instance %s failed: %s", claim.sop_instance_uid, item.error)
        try:
            with metrics.stage_cpu(metrics.Stage.RECORD), self.db.session() as session:
                fail_instance(session, claim, worker=self.worker, reason=item.error or "unknown", now=utcnow())
        except DatabaseError as exc:  # the lease runs out and the instance is claimed again
            log.error("cannot record the failure of %s: %s", claim.sop_instance_uid, exc)
