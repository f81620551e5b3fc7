"""Registering received instances: studies and series upserted, versions decided, audited.

A re-sent SOP Instance UID with the same bytes is a duplicate (nothing new stored or
queued); with different bytes it becomes a new version that supersedes the old one
and is flagged in the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.states import AuditEventType, InstanceState, Outcome
from gastrolens.db.tables import Instance, Series, Study, utcnow

if TYPE_CHECKING:  # the header type only; db does not depend on dicom_io
    from gastrolens.dicom_io.inspect import InstanceHeader


@dataclass(frozen=True)
class VersionPlan:
    """What to do with a received instance: ``duplicate_of`` set means store nothing."""

    version: int
    duplicate_of: int | None = None

    @property
    def is_duplicate(self) -> bool:
        return self.duplicate_of is not None


def plan_version(session: Session, header: InstanceHeader) -> VersionPlan:
    rows = session.execute(
        select(Instance.id, Instance.version, Instance.sha256).where(Instance.sop_instance_uid == header.sop_uid)
    ).all()
    for row in rows:
        if row.sha256 == header.sha256:
            return VersionPlan(version=row.version, duplicate_of=row.id)
    return VersionPlan(version=max((r.version for r in rows), default=0) + 1)


def record_duplicate(session: Session, header: InstanceHeader, plan: VersionPlan, actor: str) -> None:
    audit.record(
        session,
        audit.Event(
            AuditEventType.INSTANCE_DUPLICATE,
            actor,
            Outcome.SUCCESS,
            header.study_uid,
            header.series_uid,
            header.sop_uid,
            {"instance_id": plan.duplicate_of, "sha256": header.sha256, "note": "same content re-sent; nothing stored"},
        ),
    )


def record_instance(
    session: Session,
    header: InstanceHeader,
    plan: VersionPlan,
    relative_path: str,
    *,
    calling_ae: str | None,
    peer_address: str | None,
    actor: str,
) -> Instance:
    """Insert the instance (state received) and its audit event in ``session``."""
    study_id = _upsert_study(session, header)
    series_id = _upsert_series(session, header, study_id)
    if plan.version > 1:
        session.execute(
            update(Instance).where(Instance.sop_instance_uid == header.sop_uid).values(superseded=True)
        )
    instance = Instance(
        sop_instance_uid=header.sop_uid,
        version=plan.version,
        series_id=series_id,
        study_id=study_id,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=header.transfer_syntax_uid,
        state=InstanceState.RECEIVED,
        file_path=relative_path,
        sha256=header.sha256,
        size_bytes=header.size_bytes,
        calling_ae=calling_ae,
        peer_address=peer_address,
    )
    session.add(instance)
    session.flush()
    new_version = plan.version > 1
    audit.record(
        session,
        audit.Event(
            AuditEventType.INSTANCE_NEW_VERSION if new_version else AuditEventType.INSTANCE_RECEIVED,
            actor,
            Outcome.WARNING if new_version else Outcome.SUCCESS,
            header.study_uid,
            header.series_uid,
            header.sop_uid,
            {
                "instance_id": instance.id,
                "version": plan.version,
                "sha256": header.sha256,
                "size_bytes": header.size_bytes,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "path": relative_path,
                **({"note": "different content under an existing SOP Instance UID"} if new_version else {}),
            },
        ),
    )
    return instance


def _insert(session: Session, table: type):  # type: ignore[no-untyped-def]
    dialect = session.get_bind().dialect.name
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(table)


def _upsert_study(session: Session, header: InstanceHeader) -> int:
    now = utcnow()
    stmt = _insert(session, Study).values(
        study_instance_uid=header.study_uid,
        patient_id=header.patient_id,
        patient_name=header.patient_name,
        accession_number=(header.accession_number or None) and header.accession_number[:16],
        study_date=header.study_date,
        study_description=header.study_description and header.study_description[:64],
        first_received_at=now,
        last_received_at=now,
        report_revision=0,
    )
    session.execute(stmt.on_conflict_do_nothing(index_elements=["study_instance_uid"]))
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == header.study_uid))
    session.execute(update(Study).where(Study.id == study_id).values(last_received_at=now))
    return int(study_id)  # type: ignore[arg-type]


def _upsert_series(session: Session, header: InstanceHeader, study_id: int) -> int:
    stmt = _insert(session, Series).values(
        series_instance_uid=header.series_uid,
        study_id=study_id,
        modality=header.modality and header.modality[:16],
        series_number=header.series_number,
    )
    session.execute(stmt.on_conflict_do_nothing(index_elements=["series_instance_uid"]))
    return int(session.scalar(select(Series.id).where(Series.series_instance_uid == header.series_uid)))  # type: ignore[arg-type]
