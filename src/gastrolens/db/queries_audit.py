"""Reading the audit trail: pages for the API, a stream for exports, and checking exported rows.

Exported rows keep ``prev_hash`` and ``hash`` and the detail exactly as hashed, so
anyone holding an export can recompute every row's hash (:func:`verify_rows`) and,
where ids follow each other, check the links between rows; the chain as a whole is
checked in the database by :func:`gastrolens.db.audit.verify_chain`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timezone

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.filters import AuditFilter, AuditQuery
from gastrolens.db.tables import AuditEvent
from gastrolens.db.views import AuditRow, Page


def list_events(session: Session, query: AuditQuery) -> Page[AuditRow]:
    """One page of the events matching ``query``."""
    stmt = _filtered(query)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    order = AuditEvent.id.asc() if query.order == "asc" else AuditEvent.id.desc()
    items = [audit_row(e) for e in session.scalars(stmt.order_by(order).limit(query.limit).offset(query.offset))]
    end = query.offset + len(items)
    return Page[AuditRow](items=items, total=total, limit=query.limit, offset=query.offset,
                          next_offset=end if end < total else None)


def iter_events(session: Session, flt: AuditFilter, batch: int = 2000) -> Iterator[AuditRow]:
    """Every event matching ``flt`` in chain order, read ``batch`` rows at a time."""
    last_id = 0
    while True:
        rows = session.scalars(_filtered(flt).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)).all()
        if not rows:
            return
        for row in rows:
            yield audit_row(row)
        last_id = rows[-1].id
        session.expunge_all()


def _filtered(flt: AuditFilter) -> Select[AuditEvent]:
    stmt = select(AuditEvent)
    if flt.since is not None:
        stmt = stmt.where(AuditEvent.at >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(AuditEvent.at < flt.until)
    if flt.type:
        stmt = stmt.where(AuditEvent.event_type.in_(flt.type))
    if flt.actor is not None:
        stmt = stmt.where(AuditEvent.actor == flt.actor)
    if flt.study_uid is not None:
        stmt = stmt.where(AuditEvent.study_uid == flt.study_uid)
    return stmt


def audit_row(event: AuditEvent) -> AuditRow:
    at = event.at if event.at.tzinfo is not None else event.at.replace(tzinfo=timezone.utc)
    return AuditRow(
        id=event.id, at=at, event_type=event.event_type, actor=event.actor, outcome=event.outcome,
        study_uid=event.study_uid, series_uid=event.series_uid, sop_uid=event.sop_uid,
        detail=event.detail, prev_hash=event.prev_hash, hash=event.hash,
    )


@dataclass
class RowsCheck:
    """What :func:`verify_rows` found. ``gaps`` are places where ids skip (a filtered export)."""

    rows: int = 0
    linked: int = 0
    gaps: int = 0
    first_broken_id: int | None = None
    reason: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.first_broken_id is None


def verify_rows(rows: Iterable[AuditRow]) -> RowsCheck:
    """Recompute each row's hash; where ids are consecutive, check ``prev_hash`` links them."""
    check = RowsCheck()
    previous: AuditRow | None = None
    for row in rows:
        check.rows += 1
        problem = None
        if audit.row_hash(_as_event(row)) != row.hash:
            problem = "content does not match its hash (the row was edited)"
        elif previous is not None and row.id == previous.id + 1:
            if row.prev_hash != previous.hash:
                problem = "prev_hash does not match the previous row's hash"
            else:
                check.linked += 1
        elif previous is not None:
            if row.id <= previous.id:
                problem = "rows are not in chain order"
            else:
                check.gaps += 1
        if problem is not None:
            check.problems.append(f"row {row.id}: {problem}")
            if check.first_broken_id is None:
                check.first_broken_id, check.reason = row.id, problem
        previous = row
    return check


def _as_event(row: AuditRow) -> AuditEvent:
    # A transient ORM object (never added to a session) so the writer's own hash function applies.
    return AuditEvent(
        id=row.id, at=row.at, event_type=row.event_type, actor=row.actor, outcome=row.outcome,
        study_uid=row.study_uid, series_uid=row.series_uid, sop_uid=row.sop_uid, detail=row.detail,
        prev_hash=row.prev_hash, hash=row.hash,
    )
