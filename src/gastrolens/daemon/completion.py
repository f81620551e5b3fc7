"""Study completion: a study quiet for ``study_quiet_seconds`` gets its study-level SR.

A study is due when none of its instances waits for inference, its last instance
arrived at least ``study_quiet_seconds`` ago, and it has results newer than its last
report. A later instance therefore produces revision n+1, which names revision n in
its Predecessor Documents Sequence. The revision counter is advanced with a
compare-and-set, so two processes never write the same revision twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import exists, func, select, update

from gastrolens.config import Settings
from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType, InstanceState, Outcome
from gastrolens.findings import OutputKind
from gastrolens.db.tables import Instance, Output, Result, Series, Study, utcnow
from gastrolens.dicom_io.documents.outputs import PredecessorRef, write_study_sr
from gastrolens.storage.store import Store
from gastrolens.errors import GastroLensError
from gastrolens.findings import CLASS_ORDER, ImageFinding, LesionClass, ModelIdentity

log = logging.getLogger(__name__)


class StudyCompletion:
    def __init__(self, settings: Settings, db: Database, store: Store, worker: str) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker = worker

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
        with self.db.session() as session:
            return list(session.scalars(stmt))

    def run_once(self) -> int:
        """Report every due study; returns how many study SRs were written."""
        written = 0
        if not self.settings.outputs.sr:
            return 0
        for study_id in self.due_studies():
            try:
                written += self.report(study_id)
            except GastroLensError as exc:
                log.error("study %d: cannot write the study SR: %s", study_id, exc)
        return written

    def report(self, study_id: int) -> int:
        with self.db.session() as session:
            study = session.get(Study, study_id)
            assert study is not None
            revision = study.report_revision + 1
            study_uid = study.study_instance_uid
            rows = session.execute(
                select(Instance, Result)
                .join(Result, Result.instance_id == Instance.id)
                .where(Instance.study_id == study_id, Instance.state == InstanceState.DONE,
                       Instance.superseded.is_(False))
                .order_by(Instance.received_at, Instance.id, Result.frame_number)
            ).all()
            previous = session.scalars(select(Output).where(Output.study_id == study_id,
                                                            Output.kind == OutputKind.STUDY_SR)
                                       .order_by(Output.revision.desc())).first()
            predecessor = (PredecessorRef(previous.sop_instance_uid, previous.series_instance_uid,
                                          previous.sop_class_uid) if previous else None)
        if not rows:
            return 0
        study_pairs = self._study_pairs(rows)
        report = write_study_sr(study_pairs, self.store.absolute(f"outputs/{study_uid}"), self.settings.outputs,
                                revision=revision, predecessor=predecessor, fsync=self.settings.storage.fsync)
        from gastrolens.daemon.pipeline import queue_deliveries

        with self.db.session() as session:
            advanced = session.execute(update(Study).where(Study.id == study_id,
                                                           Study.report_revision == revision - 1)
                                       .values(report_revision=revision, reported_at=utcnow(),
                                               conclusion=report.conclusion.conclusion.value)).rowcount
            if advanced != 1:
                log.info("study %s revision %d was reported by another worker", study_uid, revision)
                return 0
            written = report.output
            output = Output(kind=OutputKind.STUDY_SR, study_id=study_id, instance_id=None,
                            sop_instance_uid=written.sop_instance_uid,
                            series_instance_uid=written.series_instance_uid, sop_class_uid=written.sop_class_uid,
                            file_path=self.store.relative(written.path), revision=revision,
                            model_sha256=study_pairs[0][1][0].model.weights_sha256)
            session.add(output)
            session.flush()
            queue_deliveries(session, output, self.settings)
            audit.record(session, audit.Event(
                type=AuditEventType.STUDY_REPORTED, actor=self.worker, outcome=Outcome.SUCCESS, study_uid=study_uid,
                series_uid=written.series_instance_uid, sop_uid=written.sop_instance_uid,
                detail={"revision": revision, "conclusion": report.conclusion.conclusion.value,
                 "reported": [c.value for c in report.conclusion.reported_classes],
                 "images": report.conclusion.image_count,
                 "predecessor": predecessor.sop_instance_uid if predecessor else None}))
        log.info("study %s: SR revision %d, conclusion %s", study_uid, revision, report.conclusion.conclusion.value)
        return 1

    def _study_pairs(self, rows) -> list[tuple[Dataset, list[ImageFinding]]]:  # type: ignore[no-untyped-def]
        pairs: dict[int, tuple[Dataset, list[ImageFinding]]] = {}
        for instance, result in rows:
            if instance.id not in pairs:
                header = dcmread(self.store.absolute(instance.file_path), stop_before_pixels=True)
                pairs[instance.id] = (header, [])
            pairs[instance.id][1].append(finding_from_result(result))
        return list(pairs.values())


def finding_from_result(result: Result) -> ImageFinding:
    """An ImageFinding rebuilt from its database row (without the mask, which the study SR does not use)."""
    probabilities = (result.p_normal, result.p_pu, result.p_egc_hgin, result.p_agc, result.p_smt)
    assert len(probabilities) == len(CLASS_ORDER)
    return ImageFinding(
        probabilities=probabilities,
        predicted=LesionClass(result.predicted_class),
        lesion_present=result.lesion_present,
        mask=np.zeros((0, 0), dtype=bool),
        lesion_area_fraction=result.lesion_area_fraction,
        bbox=tuple(result.bbox) if result.bbox else None,  # type: ignore[arg-type]
        model=ModelIdentity(result.model_name, result.model_version, result.model_sha256, result.untrained),
    )
