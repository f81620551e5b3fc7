"""The work queues: instances waiting for inference and outputs waiting for delivery.

A worker claims rows by setting ``claimed_by`` and a lease expiry in one transaction;
on PostgreSQL the candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` so several
processes never claim the same row, on SQLite the database write lock serialises
claims. A claim whose lease expired belongs to a process that died and is claimed
again. A worker finishes a row only while it still holds the claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState, Outcome
from gastrolens.db.tables import Delivery, Instance, Series, Study, utcnow


@dataclass(frozen=True)
class ClaimedInstance:
    """What a worker needs to process one instance, detached from the session."""

    id: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    study_id: int
    file_path: str
    attempts: int


def _skip_locked(session: Session, stmt, table: type):  # type: ignore[no-untyped-def]
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True, of=table)
    return stmt


def claim_instances(session: Session, worker: str, limit: int, lease_seconds: float) -> list[ClaimedInstance]:
    """Claim up to ``limit`` instances waiting longest (received, or claimed with an expired lease)."""
    now = utcnow()
    waiting = or_(
        Instance.state == InstanceState.RECEIVED,
        and_(Instance.state == InstanceState.CLAIMED, Instance.lease_expires_at < now),
    )
    stmt = (
        select(Instance.id)
        .where(waiting, Instance.superseded.is_(False))
        .order_by(Instance.received_at, Instance.id)
        .limit(limit)
    )
    ids = list(session.scalars(_skip_locked(session, stmt, Instance)))
    if not ids:
        return []
    rows = session.execute(
        select(Instance, Series.series_instance_uid, Study.study_instance_uid)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Instance.study_id == Study.id)
        .where(Instance.id.in_(ids))
        .order_by(Instance.received_at, Instance.id)
    ).all()
    claimed = []
    for instance, series_uid, study_uid in rows:
        reclaimed = instance.state == InstanceState.CLAIMED
        previous_owner = instance.claimed_by
        instance.state = InstanceState.CLAIMED
        instance.claimed_by = worker
        instance.lease_expires_at = now + timedelta(seconds=lease_seconds)
        instance.attempts += 1
        audit.record(session, audit.Event(
            type=AuditEventType.INSTANCE_RECLAIMED if reclaimed else AuditEventType.INSTANCE_CLAIMED,
            actor=worker, outcome=Outcome.WARNING if reclaimed else Outcome.SUCCESS, study_uid=study_uid, series_uid=series_uid, sop_uid=instance.sop_instance_uid,
            detail={"instance_id": instance.id, "attempt": instance.attempts,
             **({"previous_owner": previous_owner, "note": "lease expired"} if reclaimed else {})}))
        claimed.append(ClaimedInstance(instance.id, instance.sop_instance_uid, series_uid, study_uid,
                                       instance.study_id, instance.file_path, instance.attempts))
    return claimed


def hold_instance(session: Session, instance_id: int, worker: str) -> Instance | None:
    """The instance if ``worker`` still holds its claim (locked for the rest of the transaction)."""
    stmt = select(Instance).where(Instance.id == instance_id, Instance.state == InstanceState.CLAIMED,
                                  Instance.claimed_by == worker)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return session.scalars(stmt).first()


def claim_deliveries(session: Session, worker: str, limit: int, lease_seconds: float,
                     now: datetime | None = None) -> list[int]:
    """Claim deliveries that are due (pending, or retrying whose time came), unclaimed or with expired lease."""
    now = now or utcnow()
    stmt = (
        select(Delivery.id)
        .where(
            Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)),
            Delivery.next_attempt_at <= now,
            or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now),
        )
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    )
    ids = list(session.scalars(_skip_locked(session, stmt, Delivery)))
    if ids:
        session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(
            claimed_by=worker, lease_expires_at=now + timedelta(seconds=lease_seconds)))
    return ids
