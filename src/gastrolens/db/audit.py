"""The audit trail's only writer, and its verifier.

Each row's ``hash`` is ``sha256(prev_hash + canonical row content)``, so editing or
deleting any row breaks the chain from there on. Writers serialise on the chain's
head: PostgreSQL takes a transaction-scoped advisory lock, SQLite already holds its
write lock (``BEGIN IMMEDIATE``). The event is committed with the caller's session,
so an audited state change and its audit row land together or not at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from gastrolens.db.engine import on_postgresql
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.db.tables import AuditEvent

GENESIS_HASH = "0" * 64
_ADVISORY_LOCK_KEY = 0x6761_7374_726F  # "gastro"


@dataclass(frozen=True, kw_only=True)
class Event:
    """What happened, to what, by whom. ``detail`` must be JSON-serialisable."""

    type: AuditEventType
    actor: str
    outcome: Outcome = Outcome.SUCCESS
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


_LAST_HASH = select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)
_INSERT = insert(AuditEvent)


def record(session: Session, event: Event) -> str:
    """Append ``event`` to the chain inside ``session``'s transaction; returns its hash.

    A plain INSERT rather than an ORM object: it runs on every C-STORE.
    """
    return record_many(session, [event])[-1]


def record_many(session: Session, events: Sequence[Event]) -> list[str]:
    """Append ``events`` to the chain, in order, inside ``session``'s transaction (one
    read of the chain's end, one INSERT of all rows); returns their hashes."""
    if not events:
        return []
    if on_postgresql(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
    prev = session.execute(_LAST_HASH).scalar() or GENESIS_HASH
    rows = []
    for event in events:
        row = AuditEvent(
            at=datetime.now(timezone.utc),
            event_type=event.type,
            actor=event.actor[:256],
            outcome=event.outcome,
            study_uid=event.study_uid,
            series_uid=event.series_uid,
            sop_uid=event.sop_uid,
            detail=canonical_json(event.detail),
            prev_hash=prev,
        )
        row.hash = prev = row_hash(row)
        rows.append({column: getattr(row, column) for column in _COLUMNS})
    session.execute(_INSERT, rows)  # executemany: rows are inserted (and numbered) in this order
    return [row["hash"] for row in rows]


_COLUMNS = ("at", "event_type", "actor", "outcome", "study_uid", "series_uid", "sop_uid", "detail", "prev_hash", "hash")


def canonical_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _utc_text(at: datetime) -> str:
    # SQLite hands back naive datetimes; everything is stored in UTC.
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row_hash(row: AuditEvent) -> str:
    content = canonical_json(
        {
            "at": _utc_text(row.at),
            "type": AuditEventType(row.event_type).value,
            "actor": row.actor,
            "outcome": Outcome(row.outcome).value,
            "study_uid": row.study_uid,
            "series_uid": row.series_uid,
            "sop_uid": row.sop_uid,
            "detail": row.detail,
        }
    )
    return hashlib.sha256((row.prev_hash + content).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    rows: int
    first_broken_id: int | None = None
    reason: str | None = None

    @property
    def intact(self) -> bool:
        return self.first_broken_id is None


def verify_chain(session: Session, batch: int = 5000) -> ChainReport:
    """Walk the whole chain in id order; report the first row that does not verify."""
    expected_prev = GENESIS_HASH
    count = 0
    for row in _rows_in_order(session, batch):
        count += 1
        if row.prev_hash != expected_prev:
            return ChainReport(count, row.id,
                               "prev_hash does not match the previous row's hash (a row was removed or reordered)")
        if row_hash(row) != row.hash:
            return ChainReport(count, row.id, "content does not match its hash (the row was edited)")
        expected_prev = row.hash
    return ChainReport(count)


def _rows_in_order(session: Session, batch: int) -> Iterator[AuditEvent]:
    last_id = 0
    while True:
        page = select(AuditEvent).where(AuditEvent.id > last_id).order_by(AuditEvent.id).limit(batch)
        rows = session.scalars(page).all()
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id
        session.expunge_all()
