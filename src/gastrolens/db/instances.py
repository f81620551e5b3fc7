"""Registering received instances: studies and series upserted, versions decided, audited.

A re-sent SOP Instance UID with the same bytes is a duplicate (nothing new stored or
queued); with different bytes it becomes a new version that supersedes the old one
and is flagged in the audit trail. A Series Instance UID belongs to one study: an
instance that files a known series under another study is refused (0xA900) before
anything is written, as a PACS refuses it, rather than attached to the first study's
series while pointing at the second study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.states import AuditEventType, InstanceState, Outcome
from gastrolens.db.tables import Instance, Series, Study, utcnow
from gastrolens.errors import InvalidInstanceError

STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""The DICOM failure status for a data set that contradicts what is stored (db does not import dicom_io)."""


class InstanceHeader(Protocol):
    """What the database keeps about a received instance (``dicom_io.net.inspect.InstanceHeader`` fits)."""

    @property
    def study_uid(self) -> str: ...
    @property
    def series_uid(self) -> str: ...
    @property
    def sop_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def transfer_syntax_uid(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def patient_id(self) -> str | None: ...
    @property
    def patient_name(self) -> str | None: ...
    @property
    def accession_number(self) -> str | None: ...
    @property
    def study_date(self) -> str | None: ...
    @property
    def study_description(self) -> str | None: ...
    @property
    def modality(self) -> str | None: ...
    @property
    def series_number(self) -> int | None: ...


class SeriesUnderAnotherStudy(InvalidInstanceError):
    """The instance's Series Instance UID is already stored under a different study."""

    def __init__(self, series_uid: str, stored_study_uid: str, study_uid: str) -> None:
        super().__init__(
            f"Series Instance UID {series_uid} already belongs to study {stored_study_uid}; "
            f"this instance files it under study {study_uid}",
            STATUS_DOES_NOT_MATCH_SOP_CLASS,
        )


@dataclass(frozen=True, kw_only=True)
class VersionPlan:
    """What to do with a received instance: ``duplicate_of`` set means store nothing."""

    version: int
    duplicate_of: int | None = None
    series_id: int | None = None
    """The stored series this instance joins, when the series is already known."""

    @property
    def is_duplicate(self) -> bool:
        return self.duplicate_of is not None


def plan_version(session: Session, header: InstanceHeader) -> VersionPlan:
    """Duplicate, new or new version; raises :class:`SeriesUnderAnotherStudy` before anything is written."""
    rows = session.execute(_SELECT_VERSIONS, {"uid": header.sop_uid}).all()
    for row in rows:
        if row.sha256 == header.sha256:
            return VersionPlan(version=row.version, duplicate_of=row.id)
    series = session.execute(_SELECT_SERIES, {"uid": header.series_uid}).first()
    if series is not None and series.study_instance_uid != header.study_uid:
        raise SeriesUnderAnotherStudy(header.series_uid, series.study_instance_uid, header.study_uid)
    return VersionPlan(
        version=max((r.version for r in rows), default=0) + 1, series_id=series.id if series is not None else None
    )


def record_duplicate(session: Session, header: InstanceHeader, plan: VersionPlan, actor: str) -> None:
    audit.record(
        session,
        audit.Event(
            type=AuditEventType.INSTANCE_DUPLICATE,
            actor=actor,
            outcome=Outcome.SUCCESS,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            detail={
                "instance_id": plan.duplicate_of,
                "sha256": header.sha256,
                "note": "same content re-sent; nothing stored",
            },
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
) -> int:
    """Insert the instance (state received) and its audit event in ``session``; return its id.

    Core statements, not the ORM unit of work: this runs once per C-STORE, while the
    peer waits for the answer.
    """
    study_id = _upsert_study(session, header)
    series_id = plan.series_id if plan.series_id is not None else _upsert_series(session, header, study_id)
    if plan.version > 1:
        session.execute(update(Instance).where(Instance.sop_instance_uid == header.sop_uid).values(superseded=True))
    instance_id = session.execute(
        _INSERT_INSTANCE,
        {
            "sop_instance_uid": header.sop_uid,
            "version": plan.version,
            "series_id": series_id,
            "study_id": study_id,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "state": InstanceState.RECEIVED,
            "file_path": relative_path,
            "sha256": header.sha256,
            "size_bytes": header.size_bytes,
            "calling_ae": calling_ae,
            "peer_address": peer_address,
        },
    ).scalar_one()
    new_version = plan.version > 1
    audit.record(
        session,
        audit.Event(
            type=AuditEventType.INSTANCE_NEW_VERSION if new_version else AuditEventType.INSTANCE_RECEIVED,
            actor=actor,
            outcome=Outcome.WARNING if new_version else Outcome.SUCCESS,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            detail={
                "instance_id": instance_id,
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
    return int(instance_id)


# Statements built once: SQLAlchemy then reuses their cache keys and compiled SQL.
# Core on the tables, not ORM-enabled DML: less work per statement.
_INSTANCES, _SERIES, _STUDIES = (cast(Table, t.__table__) for t in (Instance, Series, Study))
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_SELECT_VERSIONS = select(_INSTANCES.c.id, _INSTANCES.c.version, _INSTANCES.c.sha256).where(
    _INSTANCES.c.sop_instance_uid == bindparam("uid")
)
_SELECT_SERIES = (
    select(_SERIES.c.id, _SERIES.c.study_id, _STUDIES.c.study_instance_uid)
    .join_from(_SERIES, _STUDIES, _SERIES.c.study_id == _STUDIES.c.id)
    .where(_SERIES.c.series_instance_uid == bindparam("uid"))
)
_UPSERTS: dict[str, tuple[Any, Any]] = {}


def _upsert_statements(session: Session) -> tuple[Any, Any]:
    """(study upsert returning id, series insert-if-absent returning id) for the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect not in _UPSERTS:
        dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
        study = dialect_insert(_STUDIES)
        series = dialect_insert(_SERIES)
        _UPSERTS[dialect] = (
            study.on_conflict_do_update(
                index_elements=["study_instance_uid"], set_={"last_received_at": study.excluded.last_received_at}
            ).returning(_STUDIES.c.id),
            series.on_conflict_do_nothing(index_elements=["series_instance_uid"]).returning(_SERIES.c.id),
        )
    return _UPSERTS[dialect]


def _upsert_study(session: Session, header: InstanceHeader) -> int:
    """Insert the study or bump its last_received_at, in one statement; return its id."""
    now = utcnow()
    study_upsert, _ = _upsert_statements(session)
    study_id = session.execute(
        study_upsert,
        {
            "study_instance_uid": header.study_uid,
            "patient_id": header.patient_id,
            "patient_name": header.patient_name,
            "accession_number": (header.accession_number or None) and header.accession_number[:16],
            "study_date": header.study_date,
            "study_description": header.study_description and header.study_description[:64],
            "first_received_at": now,
            "last_received_at": now,
            "report_revision": 0,
        },
    ).scalar_one()
    return int(study_id)


def _upsert_series(session: Session, header: InstanceHeader, study_id: int) -> int:
    """The series id: inserted, or found when a concurrent writer inserted it first."""
    _, series_insert = _upsert_statements(session)
    series_id = session.execute(
        series_insert,
        {
            "series_instance_uid": header.series_uid,
            "study_id": study_id,
            "modality": header.modality and header.modality[:16],
            "series_number": header.series_number,
        },
    ).scalar()
    if series_id is None:  # inserted by a concurrent writer (PostgreSQL) since plan_version looked
        series = session.execute(_SELECT_SERIES, {"uid": header.series_uid}).one()
        if series.study_id != study_id:
            raise SeriesUnderAnotherStudy(header.series_uid, series.study_instance_uid, header.study_uid)
        series_id = series.id
    return int(series_id)
