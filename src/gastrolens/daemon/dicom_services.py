"""The storage commitment and MPPS services wired to the store and the database.

The receiver (``dicom_io.net``) speaks DICOM and hands each request to a book defined
there; these are the books. Both run in every receiver process, each with its own
database engine, so what they learn reaches the completion job through the database.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from gastrolens.config import Settings
from gastrolens.daemon.query_retrieve import DatabaseCatalog
from gastrolens.db import Database
from gastrolens.db.states import Outcome, ProcedureStepStatus
from gastrolens.db.tables import utcnow
from gastrolens.db.transitions_services import (
    NewStep,
    StepUpdate,
    create_procedure_step,
    held_instances,
    record_commitment_event,
    refuse_procedure_step,
    update_procedure_step,
)
from gastrolens.dicom_io.net.commitment import CommitmentReport, CommitmentRequest, StorageCommitmentSCP
from gastrolens.dicom_io.net.mpps import ProcedureStepSCP, StepAnswer, StepRequest
from gastrolens.dicom_io.net.query_retrieve import QueryRetrieve
from gastrolens.dicom_io.net.services import STATUS_CLASS_INSTANCE_CONFLICT, STATUS_NO_SUCH_OBJECT, DicomService
from gastrolens.errors import GastroLensError
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)


def dicom_services(settings: Settings, db: Database, store: Store,
                   write_lock: AbstractContextManager[Any] | None = None) -> list[DicomService]:
    """Storage commitment, MPPS and Query/Retrieve, for one receiver (process)."""
    lock: AbstractContextManager[Any] = write_lock if write_lock is not None else nullcontext()
    return [
        StorageCommitmentSCP(settings.dicom.ae_title, settings.dicom.peer, DatabaseCommitmentBook(db, store, lock),
                             timeout_seconds=settings.dicom.network_timeout_seconds),
        ProcedureStepSCP(DatabaseStepBook(db, lock)),
        QueryRetrieve(settings.dicom, DatabaseCatalog(db, store, write_lock=lock)),
    ]


class DatabaseCommitmentBook:
    """Committed means: the current version's row is committed and its file is in the store."""

    def __init__(self, db: Database, store: Store, write_lock: AbstractContextManager[Any]) -> None:
        self.db = db
        self.store = store
        self._lock = write_lock

    def failures(self, references: Sequence[tuple[str, str]]) -> dict[str, int]:
        with self.db.read_session() as session:
            held = held_instances(session, [uid for _, uid in references])
        failed: dict[str, int] = {}
        for sop_class, sop_uid in references:
            found = held.get(sop_uid)
            if found is None or not self.store.absolute(found.file_path).is_file():
                failed[sop_uid] = STATUS_NO_SUCH_OBJECT
            elif found.sop_class_uid != sop_class:
                failed[sop_uid] = STATUS_CLASS_INSTANCE_CONFLICT
        return failed

    def requested(self, request: CommitmentRequest) -> None:
        self._audit(False, request.actor, Outcome.SUCCESS,
                    {"transaction_uid": request.transaction_uid, "instances": len(request.references),
                     "sop_instance_uids": [uid for _, uid in request.references][:1000]})

    def refused(self, *, actor: str, reason: str, status: int, transaction_uid: str | None) -> None:
        self._audit(False, actor, Outcome.FAILURE,
                    {"transaction_uid": transaction_uid, "status": f"0x{status:04X}", "reason": reason})

    def reported(self, report: CommitmentReport) -> None:
        outcome = (Outcome.FAILURE if not report.delivered
                   else Outcome.WARNING if report.failures else Outcome.SUCCESS)
        self._audit(True, report.request.actor, outcome, {
            "transaction_uid": report.request.transaction_uid, "via": report.via, "delivered": report.delivered,
            "committed": len(report.request.references) - len(report.failures),
            "failed": {uid: f"0x{reason:04X}" for uid, reason in list(report.failures.items())[:1000]},
            "error": report.error})

    def _audit(self, reported: bool, actor: str, outcome: Outcome, detail: dict[str, Any]) -> None:
        try:
            with self._lock, self.db.session() as session:
                record_commitment_event(session, reported=reported, actor=actor, outcome=outcome, detail=detail)
        except GastroLensError as exc:
            log.error("could not audit storage commitment %s: %s", detail.get("transaction_uid"), exc)


class DatabaseStepBook:
    """MPPS steps in ``procedure_steps``; a final state becomes a completion signal."""

    def __init__(self, db: Database, write_lock: AbstractContextManager[Any]) -> None:
        self.db = db
        self._lock = write_lock

    def create(self, request: StepRequest) -> StepAnswer:
        assert request.study_instance_uid is not None
        attributes = request.attributes
        step = NewStep(
            sop_instance_uid=request.sop_instance_uid, study_instance_uid=request.study_instance_uid,
            step_id=_text(attributes.get("PerformedProcedureStepID")),
            station_ae=_text(attributes.get("PerformedStationAETitle")), calling_ae=request.calling_ae,
            peer_address=request.peer_address, referenced=request.referenced or (),
            attributes=attributes.to_json_dict())
        with self._lock, self.db.session() as session:
            created = create_procedure_step(session, step, actor=request.actor, now=utcnow())
        return StepAnswer.DONE if created else StepAnswer.DUPLICATE

    def update(self, request: StepRequest) -> StepAnswer:
        status = ProcedureStepStatus(request.status) if request.status else None
        with self._lock, self.db.session() as session:
            outcome = update_procedure_step(session, request.sop_instance_uid, status=status,
                                            referenced=request.referenced,
                                            attributes=request.attributes.to_json_dict(), actor=request.actor,
                                            now=utcnow())
        return {StepUpdate.UPDATED: StepAnswer.DONE, StepUpdate.UNKNOWN: StepAnswer.UNKNOWN,
                StepUpdate.FINAL: StepAnswer.FINAL}[outcome]

    def refused(self, *, operation: str, actor: str, sop_instance_uid: str | None, status: int, reason: str) -> None:
        try:
            with self._lock, self.db.session() as session:
                refuse_procedure_step(session, operation=operation, actor=actor, sop_instance_uid=sop_instance_uid,
                                      status=status, reason=reason)
        except GastroLensError as exc:
            log.error("could not audit a refused MPPS %s: %s", operation, exc)


def _text(value: object) -> str | None:
    return str(value).strip() or None if value is not None else None
