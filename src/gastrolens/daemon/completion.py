"""Study completion, the one owner of every signal that a study is complete.

Three signals: the quiet timer (below), MPPS (a step COMPLETED or DISCONTINUED) and the
``gastrolens studies complete UID`` command. The last two arrive as rows in
``completion_signals`` (written by a receiver process or the CLI, so they reach any
worker through the database) and :meth:`StudyCompletion.run_signals` polls them every
:data:`SIGNAL_POLL_SECONDS`. A signalled study is reported as soon as none of its
instances waits for inference and, for MPPS COMPLETED, every image the step lists has
arrived, or ``mpps_grace_seconds`` passed since (the SR then names the missing ones).
DISCONTINUED reports what arrived and says so. Both write a PARTIAL SR with a comment.

The quiet timer: a study quiet for ``study_quiet_seconds`` gets its study-level SR.

A study is due when none of its instances waits for inference, its last instance
arrived at least ``study_quiet_seconds`` ago, and it has results newer than its last
report. A later instance therefore produces revision n+1, which names revision n in
its Predecessor Documents Sequence. The revision counter is advanced with a
compare-and-set, so two processes never write the same revision twice.

Each frame counts once, by its newest result. A study whose frames were judged by
different models (the model was updated while it arrived) gets one SR that names every
one of them, and so does its audit event: its older results are not reprocessed, since
their sources may already be gone by retention and their per-image outputs were
delivered under the older model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from gastrolens import metrics
from gastrolens.config import Settings
from gastrolens.db import Database
from gastrolens.db.states import CompletionSignalKind, InstanceState
from gastrolens.db.tables import CompletionSignal, Instance, Output, ProcedureStep, Result, Series, Study, utcnow
from gastrolens.db.transitions import NewOutput, StudyReport, record_study_report
from gastrolens.db.transitions_services import settle_signal
from gastrolens.dicom_io.documents.outputs import PredecessorRef, write_study_sr
from gastrolens.errors import GastroLensError, OutputError
from gastrolens.findings import ImageFinding, LesionClass, ModelIdentity, OutputKind
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)

SIGNAL_POLL_SECONDS = 0.5
"""How often :meth:`StudyCompletion.run_signals` looks for MPPS and command signals."""
HEADER_CACHE = 4096
"""Source headers (without pixel data) kept between study SR revisions."""
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 5.0, 300.0
"""A study whose SR cannot be written is tried again after 5 s, then twice as long each time, at most 5 min."""


class StudyCompletion:
    def __init__(self, settings: Settings, db: Database, store: Store, worker: str) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker = worker
        self._destination_names = tuple(d.name for d in settings.destinations)
        self._lock = threading.Lock()  # the quiet timer and the signal poll never report at once
        self._failing: dict[tuple[str, int], tuple[float, float]] = {}
        """(what, id) -> (when to try again, the delay after that) for work that failed."""
        self._headers: OrderedDict[tuple[int, str], Dataset] = OrderedDict()
        """Stored source headers already read, by (instance id, file path): each revision
        of a study SR reads every source of the study, and a stored file never changes."""

    # -- MPPS and command signals --------------------------------------------------------

    def run_signals(self) -> int:
        """Settle every unhandled completion signal that can be; returns how many SRs were written."""
        if not self.settings.outputs.sr:
            return 0
        with self.db.read_session() as session:
            pending = list(session.scalars(select(CompletionSignal.id).where(CompletionSignal.handled_at.is_(None))
                                           .order_by(CompletionSignal.id).limit(100)))
        return self._one_by_one("completion signal", pending, self._settle)

    def _settle(self, signal_id: int) -> int:
        now = utcnow()
        with self.db.read_session() as session:
            signal = session.get(CompletionSignal, signal_id)
            if signal is None or signal.handled_at is not None:
                return 0
            kind, study_uid = signal.kind, signal.study_instance_uid
            step = session.get(ProcedureStep, signal.procedure_step_id) if signal.procedure_step_id else None
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
            grace_over = (step is None or step.ended_at is None
                          or _aware(step.ended_at) + timedelta(seconds=self.settings.scheduler.mpps_grace_seconds)
                          <= now)
            if study_id is None:
                if kind is CompletionSignalKind.COMMAND or grace_over:
                    return self._settled(signal_id, "nothing to report: no instance of the study was received")
                return 0  # its images may still come
            waiting = session.scalar(select(func.count(Instance.id)).where(
                Instance.study_id == study_id, Instance.superseded.is_(False),
                Instance.state.in_((InstanceState.RECEIVED, InstanceState.CLAIMED))))
            if waiting:
                return 0  # report once inference has seen them
            arrived = set(session.scalars(select(Instance.sop_instance_uid).where(
                Instance.study_id == study_id, Instance.superseded.is_(False))))
            missing = [uid for uid in (step.referenced if step else []) if uid not in arrived]
            up_to_date = self._reported_since_last_result(session, study_id)
        notes: list[str] = []
        if kind is CompletionSignalKind.MPPS_DISCONTINUED:
            notes.append(f"Procedure step DISCONTINUED: this report covers the {len(arrived)} image(s) that arrived")
        if missing:
            if kind is CompletionSignalKind.MPPS_COMPLETED and not grace_over:
                return 0  # the images it lists may still arrive
            notes.append(f"{len(missing)} image(s) listed by the procedure step were not received: "
                         + ", ".join(missing))
        if not notes and up_to_date:  # the quiet timer (or another signal) already reported all of it
            return self._settled(signal_id, f"{kind.value}: the latest study SR already covers every finding")
        written = self.report(study_id, notes=notes)
        outcome = (f"{kind.value}: study SR written" + (f" ({len(missing)} missing)" if missing else "")
                   if written else f"{kind.value}: nothing to report (no findings)")
        self._settled(signal_id, outcome)
        return written

    @staticmethod
    def _reported_since_last_result(session: Session, study_id: int) -> bool:
        reported_at, newest = session.execute(
            select(Study.reported_at, func.max(Result.created_at))
            .select_from(Study).outerjoin(Instance, Instance.study_id == Study.id)
            .outerjoin(Result, Result.instance_id == Instance.id)
            .where(Study.id == study_id).group_by(Study.id, Study.reported_at)).one()
        return reported_at is not None and newest is not None and _aware(newest) <= _aware(reported_at)

    def _settled(self, signal_id: int, outcome: str) -> int:
        with self.db.session() as session:
            settle_signal(session, signal_id, outcome=outcome, actor=self.worker, now=utcnow())
        log.info("completion signal %d: %s", signal_id, outcome)
        return 0

    # -- the quiet timer -----------------------------------------------------------------

    def due_studies(self) -> list[int]:
        quiet_since = utcnow() - timedelta(seconds=self.settings.scheduler.study_quiet_seconds)
        pending = exists().where(Instance.study_id == Study.id,
                                 Instance.state.in_((InstanceState.RECEIVED, InstanceState.CLAIMED)),
                                 Instance.superseded.is_(False))
        newest_result = (select(func.max(Result.created_at)).join(Instance, Result.instance_id == Instance.id)
                         .where(Instance.study_id == Study.id).scalar_subquery())
        stmt = select(Study.id).where(
            Study.last_received_at <= quiet_since,
            ~pending,
            newest_result.is_not(None),
            (Study.reported_at.is_(None)) | (newest_result > Study.reported_at),
        ).order_by(Study.last_received_at)
        with self.db.read_session() as session:
            return list(session.scalars(stmt))

    def run_once(self) -> int:
        """Report every due study; returns how many study SRs were written."""
        if not self.settings.outputs.sr:
            return 0
        return self._one_by_one("study", self.due_studies(), self.report)

    def _one_by_one(self, what: str, ids: Sequence[int], work: Callable[[int], int]) -> int:
        """``work`` on each id under the report lock; one that fails is logged and never blocks the others.

        A failed id waits (:data:`RETRY_FIRST_SECONDS`, doubling) before it is tried again, so
        a study that cannot be reported does not fill the log twice a second."""
        written = 0
        now = time.monotonic()
        for item in ids:
            retry_at, delay = self._failing.get((what, item), (0.0, RETRY_FIRST_SECONDS / 2))
            if retry_at > now:
                continue
            try:
                with self._lock, metrics.stage_cpu(metrics.Stage.COMPLETE):
                    written += work(item)
            except (GastroLensError, OSError, InvalidDicomError) as exc:
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                self._failing[(what, item)] = (now + delay, delay)
                log.error("%s %d: cannot write the study SR (next try in %.0f s): %s", what, item, delay, exc)
            else:
                self._failing.pop((what, item), None)
        return written

    def report(self, study_id: int, *, notes: Sequence[str] = ()) -> int:
        """Write the study's next SR revision from the newest finding of every frame; 1 if written.

        ``notes`` (why the report is incomplete) make it a PARTIAL SR that says so."""
        with self.db.read_session() as session:
            study = session.get(Study, study_id)
            assert study is not None
            revision = study.report_revision + 1
            study_uid = study.study_instance_uid
            rows = session.execute(
                select(Instance, Result, Series.series_instance_uid)
                .join(Result, Result.instance_id == Instance.id)
                .join(Series, Instance.series_id == Series.id)
                .where(Instance.study_id == study_id, Instance.state == InstanceState.DONE,
                       Instance.superseded.is_(False))
                .order_by(Instance.received_at, Instance.id, Result.frame_number, Result.created_at, Result.id)
            ).all()
            previous = session.scalars(select(Output).where(Output.study_id == study_id,
                                                            Output.kind == OutputKind.STUDY_SR)
                                       .order_by(Output.revision.desc())).first()
            predecessor = (PredecessorRef(previous.sop_instance_uid, previous.series_instance_uid,
                                          previous.sop_class_uid) if previous else None)
        if not rows:
            return 0
        study_pairs, models = self._study_pairs(rows, study)
        written = write_study_sr(study_pairs, self.store.output_folder(study_uid), self.settings.outputs,
                                 revision=revision, predecessor=predecessor, fsync=self.settings.storage.fsync,
                                 notes=notes)
        conclusion = written.conclusion
        report = StudyReport(
            study_id=study_id, study_instance_uid=study_uid, revision=revision,
            output=NewOutput(kind=OutputKind.STUDY_SR, sop_instance_uid=written.output.sop_instance_uid,
                             series_instance_uid=written.output.series_instance_uid,
                             sop_class_uid=written.output.sop_class_uid,
                             file_path=self.store.relative(written.output.path)),
            conclusion=conclusion.conclusion.value, reported=[c.value for c in conclusion.reported_classes],
            images=conclusion.image_count, models=models,
            predecessor_sop_uid=predecessor.sop_instance_uid if predecessor else None)
        with self.db.session() as session:
            recorded = record_study_report(session, report, worker=self.worker, destinations=self._destination_names,
                                           now=utcnow())
        if not recorded:
            log.info("study %s revision %d was reported by another worker", study_uid, revision)
            return 0
        log.info("study %s: SR revision %d, conclusion %s, %d model(s)", study_uid, revision,
                 conclusion.conclusion.value, len(models))
        return 1

    def _study_pairs(self, rows: Sequence[Any],
                     study: Study) -> tuple[list[tuple[Dataset, list[ImageFinding]]], list[ModelIdentity]]:
        """Each instance's header with the newest finding of each of its frames, and the models behind them.

        An instance processed again (by another model) has several results per frame; the
        newest counts. The models are in the order of their newest finding, newest last.
        """
        headers: dict[int, Dataset] = {}
        rebuilt: list[int] = []
        frames: dict[int, dict[int, Result]] = {}
        for instance, result, series_uid in rows:  # ordered by frame, then age: a later row replaces an earlier one
            if instance.id not in headers:
                stored = self._stored_header(instance)
                if stored is None:
                    rebuilt.append(instance.id)
                headers[instance.id] = stored or _header_from_database(instance, series_uid, study)
                frames[instance.id] = {}
            frames[instance.id][result.frame_number] = result
        for instance_id in rebuilt:
            if len(frames[instance_id]) > 1:
                headers[instance_id].NumberOfFrames = len(frames[instance_id])
        pairs = [(headers[i], [finding_from_result(frames[i][n]) for n in sorted(frames[i])]) for i in headers]
        current = [r for by_frame in frames.values() for r in by_frame.values()]
        newest = sorted(current, key=lambda r: (r.created_at, r.id))
        models = list(dict.fromkeys(_identity(r) for r in reversed(newest)))[::-1]
        return pairs, models


    def _stored_header(self, instance: Instance) -> Dataset | None:
        """The stored source's header, or None when retention (or anything else) removed the file."""
        if instance.removed_at is None:
            key = (instance.id, instance.file_path)
            header = self._headers.get(key)
            if header is not None:
                self._headers.move_to_end(key)
                return header
            try:
                header = dcmread(self.store.absolute(instance.file_path), stop_before_pixels=True)
            except FileNotFoundError:
                log.warning("source %s is missing from the store", instance.sop_instance_uid)
                return None
            self._headers[key] = header
            while len(self._headers) > HEADER_CACHE:
                self._headers.popitem(last=False)
            return header
        return None


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC


def _header_from_database(instance: Instance, series_uid: str, study: Study) -> Dataset:
    """A source header from what the database kept of it.

    A late image can arrive in a study whose earlier sources retention already removed:
    the next revision still covers every image, referenced by the UIDs and the
    patient/study attributes the database holds.
    """
    if instance.rows is None or instance.columns is None:
        raise OutputError(f"source {instance.sop_instance_uid} was removed and its image size is not known "
                          "(processed before GastroLens kept it)")
    header = Dataset()
    header.Rows, header.Columns = instance.rows, instance.columns
    header.SOPClassUID = instance.sop_class_uid
    header.SOPInstanceUID = instance.sop_instance_uid
    header.SeriesInstanceUID = series_uid
    header.StudyInstanceUID = study.study_instance_uid
    header.PatientID = study.patient_id
    header.PatientName = study.patient_name
    header.AccessionNumber = study.accession_number
    header.StudyDate = study.study_date
    header.StudyDescription = study.study_description
    if study.patient_name and not study.patient_name.isascii():
        header.SpecificCharacterSet = "ISO_IR 192"
    return header


def _identity(result: Result) -> ModelIdentity:
    return ModelIdentity(result.model_name, result.model_version, result.model_sha256, result.untrained)


def finding_from_result(result: Result) -> ImageFinding:
    """An ImageFinding rebuilt from its database row (without the mask, which the study SR does not use)."""
    return ImageFinding(
        probabilities=result.probabilities,
        predicted=LesionClass(result.predicted_class),
        lesion_present=result.lesion_present,
        mask=np.zeros((0, 0), dtype=bool),
        lesion_area_fraction=result.lesion_area_fraction,
        bbox=tuple(result.bbox) if result.bbox else None,  # type: ignore[arg-type]
        model=_identity(result),
    )
