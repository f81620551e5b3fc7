"""The writers for storage commitment, MPPS steps and study completion signals.

Each function writes its rows and its audit event in the caller's transaction, so a
recorded state change and its audit row land together or not at all. The receiver
processes (MPPS, storage commitment) and the CLI (``studies complete``) write the
signals; the completion job (``daemon.completion``) reads and settles them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.states import AuditEventType, CompletionSignalKind, Outcome, ProcedureStepStatus
from gastrolens.db.tables import CompletionSignal, Instance, ProcedureStep, Study
from gastrolens.db.transitions import updated_rows

FINAL_STATES = (ProcedureStepStatus.COMPLETED, ProcedureStepStatus.DISCONTINUED)


# -- storage commitment ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HeldInstance:
    sop_class_uid: str
    file_path: str
    """Relative to the storage root."""
    study_uid: str


def held_instances(session: Session, sop_uids: Sequence[str]) -> dict[str, HeldInstance]:
    """The current (not superseded, not removed) stored version of each of ``sop_uids`` that has one."""
    found: dict[str, HeldInstance] = {}
    for start in range(0, len(sop_uids), 500):
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.file_path, Study.study_instance_uid)
            .join(Study, Instance.study_id == Study.id)
            .where(Instance.sop_instance_uid.in_(sop_uids[start:start + 500]), Instance.superseded.is_(False),
                   Instance.removed_at.is_(None))
        )
        for sop_uid, sop_class, path, study_uid in rows:
            found[sop_uid] = HeldInstance(sop_class_uid=sop_class, file_path=path, study_uid=study_uid)
    return found


def record_commitment_event(session: Session, *, reported: bool, actor: str, outcome: Outcome,
                            detail: Mapping[str, Any]) -> None:
    """Audit a storage commitment request (``reported`` False) or its report (True)."""
    audit.record(session, audit.Event(
        type=AuditEventType.COMMITMENT_REPORTED if reported else AuditEventType.COMMITMENT_REQUESTED,
        actor=actor, outcome=outcome, detail=detail))


# -- MPPS --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NewStep:
    sop_instance_uid: str
    study_instance_uid: str
    step_id: str | None
    station_ae: str | None
    calling_ae: str
    peer_address: str
    referenced: Sequence[str]
    attributes: dict[str, Any]
    """DICOM JSON."""


def create_procedure_step(session: Session, step: NewStep, *, actor: str, now: datetime) -> bool:
    """Store a new IN PROGRESS step and audit it; False (audited as refused) when the UID exists."""
    existing = session.scalar(select(ProcedureStep.id).where(ProcedureStep.sop_instance_uid == step.sop_instance_uid))
    if existing is not None:
        refuse_procedure_step(session, operation="N-CREATE", actor=actor, sop_instance_uid=step.sop_instance_uid,
                              status=0x0111, reason="duplicate SOP instance", study_uid=step.study_instance_uid)
        return False
    session.add(ProcedureStep(
        sop_instance_uid=step.sop_instance_uid, study_instance_uid=step.study_instance_uid,
        status=ProcedureStepStatus.IN_PROGRESS, step_id=step.step_id, station_ae=step.station_ae,
        calling_ae=step.calling_ae, peer_address=step.peer_address, referenced=list(step.referenced),
        attributes=step.attributes, created_at=now, updated_at=now))
    session.flush()
    audit.record(session, audit.Event(
        type=AuditEventType.PROCEDURE_STEP_CREATED, actor=actor, study_uid=step.study_instance_uid,
        sop_uid=step.sop_instance_uid,
        detail={"status": ProcedureStepStatus.IN_PROGRESS.value, "step_id": step.step_id,
                "station_ae": step.station_ae, "referenced": len(step.referenced)}))
    return True


class StepUpdate(str, enum.Enum):
    """The outcome of :func:`update_procedure_step`."""

    UPDATED = "updated"
    UNKNOWN = "unknown"
    FINAL = "final"
    """The step is already COMPLETED or DISCONTINUED: unchanged."""


def update_procedure_step(session: Session, sop_instance_uid: str, *, status: ProcedureStepStatus | None,
                          referenced: Sequence[str] | None, attributes: dict[str, Any], actor: str,
                          now: datetime) -> StepUpdate:
    """Apply an N-SET: merge ``attributes`` (DICOM JSON, top level), maybe move the status.

    A step already COMPLETED or DISCONTINUED is not changed (``final``). Moving to a final
    state records a :class:`CompletionSignal` for the step's study. Every outcome is audited.
    """
    step = session.scalar(select(ProcedureStep).where(ProcedureStep.sop_instance_uid == sop_instance_uid)
                          .with_for_update())
    if step is None:
        refuse_procedure_step(session, operation="N-SET", actor=actor, sop_instance_uid=sop_instance_uid,
                              status=0x0112, reason="no such procedure step")
        return StepUpdate.UNKNOWN
    if step.status in FINAL_STATES:
        refuse_procedure_step(session, operation="N-SET", actor=actor, sop_instance_uid=sop_instance_uid,
                              status=0x0110, reason=f"the step is already {step.status.value}",
                              study_uid=step.study_instance_uid)
        return StepUpdate.FINAL
    values: dict[str, Any] = {"attributes": {**step.attributes, **attributes}, "updated_at": now}
    if referenced is not None:
        values["referenced"] = list(referenced)
    if status is not None:
        values["status"] = status
        if status in FINAL_STATES:
            values["ended_at"] = now
    # Compare-and-set on the status: two N-SETs racing in two receiver processes cannot both end the step.
    moved = updated_rows(session.execute(
        update(ProcedureStep).where(ProcedureStep.id == step.id, ProcedureStep.status == step.status).values(**values)))
    if moved != 1:
        refuse_procedure_step(session, operation="N-SET", actor=actor, sop_instance_uid=sop_instance_uid,
                              status=0x0110, reason="the step changed meanwhile", study_uid=step.study_instance_uid)
        return StepUpdate.FINAL
    new_status = status or step.status
    audit.record(session, audit.Event(
        type=AuditEventType.PROCEDURE_STEP_UPDATED, actor=actor, study_uid=step.study_instance_uid,
        sop_uid=sop_instance_uid,
        outcome=Outcome.WARNING if new_status is ProcedureStepStatus.DISCONTINUED else Outcome.SUCCESS,
        detail={"status": new_status.value, "previous": step.status.value,
                "referenced": len(referenced) if referenced is not None else len(step.referenced)}))
    if status in FINAL_STATES:
        kind = (CompletionSignalKind.MPPS_COMPLETED if status is ProcedureStepStatus.COMPLETED
                else CompletionSignalKind.MPPS_DISCONTINUED)
        session.add(CompletionSignal(study_instance_uid=step.study_instance_uid, kind=kind, procedure_step_id=step.id,
                                     actor=actor, created_at=now))
    return StepUpdate.UPDATED


def refuse_procedure_step(session: Session, *, operation: str, actor: str, sop_instance_uid: str | None,
                          status: int, reason: str, study_uid: str | None = None) -> None:
    audit.record(session, audit.Event(
        type=AuditEventType.PROCEDURE_STEP_REFUSED, actor=actor, outcome=Outcome.FAILURE, study_uid=study_uid,
        sop_uid=sop_instance_uid, detail={"operation": operation, "status": f"0x{status:04X}", "reason": reason}))


# -- study completion signals -----------------------------------------------------------


def request_completion(session: Session, study_uid: str, *, actor: str, now: datetime) -> None:
    """The ``studies complete`` command: ask the completion job to report the study now."""
    session.add(CompletionSignal(study_instance_uid=study_uid, kind=CompletionSignalKind.COMMAND, actor=actor,
                                 created_at=now))
    audit.record(session, audit.Event(type=AuditEventType.STUDY_COMPLETION_REQUESTED, actor=actor,
                                      study_uid=study_uid, detail={"kind": CompletionSignalKind.COMMAND.value}))


def settle_signal(session: Session, signal_id: int, *, outcome: str, actor: str, now: datetime) -> bool:
    """Mark a signal handled and audit what became of it (compare-and-set: only one worker settles it)."""
    settled = updated_rows(session.execute(
        update(CompletionSignal).where(CompletionSignal.id == signal_id, CompletionSignal.handled_at.is_(None))
        .values(handled_at=now, outcome=outcome[:2000]))) == 1
    if settled:
        signal = session.get(CompletionSignal, signal_id)
        assert signal is not None
        audit.record(session, audit.Event(
            type=AuditEventType.STUDY_COMPLETION_SETTLED, actor=actor, study_uid=signal.study_instance_uid,
            detail={"kind": signal.kind.value, "signal": signal_id, "outcome": outcome[:2000],
                    "requested_by": signal.actor}))
    return settled
