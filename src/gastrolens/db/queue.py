"""The work queues: claiming instances waiting for inference and deliveries that are due.

A worker claims rows by setting ``claimed_by`` and a lease expiry in one transaction;
on PostgreSQL the candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` so several
processes never claim the same row, on SQLite the database write lock serialises
claims. A claim whose lease expired belongs to a process that died and is claimed
again. Every later transition of a claimed row (finish, fail, record an attempt,
release) is in :mod:`gastrolens.db.transitions` and :mod:`gastrolens.db.transitions_delivery`,
and happens only while the worker still holds the claim.

Both claim functions take ``now``: the caller's clock decides which leases expired,
so a test moves time forward instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.engine import on_postgresql
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState, Outcome
from gastrolens.db.tables import Delivery, Instance, Output, Series, Study
from gastrolens.findings import OutputKind


@dataclass(frozen=True, kw_only=True)
class ClaimedInstance:
    """What a worker needs to process one instance, detached from the session."""

    id: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    study_id: int
    file_path: str
    attempts: int


@dataclass(frozen=True, kw_only=True)
class ClaimedDelivery:
    """One output to send to one destination, detached from the session."""

    id: int
    destination: str
    file_path: str
    """Of the output, relative to the storage root."""
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    output_kind: OutputKind
    revision: int
    """Of a study SR, its report revision (1 for other outputs)."""


def _skip_locked(session: Session, stmt: Any, table: type) -> Any:
    if on_postgresql(session):
        return stmt.with_for_update(skip_locked=True, of=table)
    return stmt


def claim_instances(session: Session, worker: str, *, limit: int, lease_seconds: float,
                    now: datetime) -> list[ClaimedInstance]:
    """Claim up to ``limit`` instances waiting longest (received, or claimed with a lease expired at ``now``)."""
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
            actor=worker, outcome=Outcome.WARNING if reclaimed else Outcome.SUCCESS, study_uid=study_uid,
            series_uid=series_uid, sop_uid=instance.sop_instance_uid,
            detail={"instance_id": instance.id, "attempt": instance.attempts,
                    **({"previous_owner": previous_owner, "note": "lease expired"} if reclaimed else {})}))
        claimed.append(ClaimedInstance(id=instance.id, sop_instance_uid=instance.sop_instance_uid,
                                       series_instance_uid=series_uid, study_instance_uid=study_uid,
                                       study_id=instance.study_id, file_path=instance.file_path,
                                       attempts=instance.attempts))
    return claimed


def claim_deliveries(session: Session, worker: str, *, limit: int, lease_seconds: float, now: datetime,
                     destination: str | None = None,
                     unknown_to: Collection[str] | None = None) -> list[ClaimedDelivery]:
    """Claim deliveries due at ``now`` (pending, or retrying whose time came), unclaimed or with an expired lease.

    ``destination`` claims only that destination's deliveries, so one association carries
    them all; ``unknown_to`` claims only those whose destination is not among these names
    (a destination removed from the configuration). Oldest due first.
    """
    conditions = _due(now, destination, unknown_to)
    stmt = select(Delivery.id).where(*conditions).order_by(Delivery.next_attempt_at, Delivery.id).limit(limit)
    ids = list(session.scalars(_skip_locked(session, stmt, Delivery)))
    if not ids:
        return []
    session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(
        claimed_by=worker, lease_expires_at=now + timedelta(seconds=lease_seconds)))
    rows = session.execute(
        select(Delivery.id, Delivery.destination, Output.file_path, Output.sop_class_uid,
               Output.sop_instance_uid, Output.series_instance_uid, Study.study_instance_uid, Output.kind,
               Output.revision)
        .join(Output, Delivery.output_id == Output.id).join(Study, Output.study_id == Study.id)
        .where(Delivery.id.in_(ids))
        .order_by(Delivery.next_attempt_at, Delivery.id)
    ).all()
    return [ClaimedDelivery(id=r.id, destination=r.destination, file_path=r.file_path, sop_class_uid=r.sop_class_uid,
                            sop_instance_uid=r.sop_instance_uid, series_instance_uid=r.series_instance_uid,
                            study_instance_uid=r.study_instance_uid, output_kind=OutputKind(r.kind),
                            revision=r.revision) for r in rows]


def deliveries_due(session: Session, *, now: datetime, destination: str | None = None,
                   unknown_to: Collection[str] | None = None) -> bool:
    """Whether :func:`claim_deliveries` would claim anything, by a read that takes no write
    lock (a read session): an idle tick then opens no write transaction."""
    return session.execute(select(Delivery.id).where(*_due(now, destination, unknown_to)).limit(1)).first() is not None


def _due(now: datetime, destination: str | None, unknown_to: Collection[str] | None) -> list[Any]:
    conditions: list[Any] = [
        Delivery.state.in_((DeliveryState.PENDING, DeliveryState.RETRYING)),
        Delivery.next_attempt_at <= now,
        or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now),
    ]
    if destination is not None:
        conditions.append(Delivery.destination == destination)
    if unknown_to is not None:
        conditions.append(Delivery.destination.not_in(list(unknown_to)))
    return conditions
