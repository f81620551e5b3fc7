"""The delivery state machine: every transition after a claim, each with its audit event.

``pending|retrying -> sent`` when the destination has the output, ``-> retrying`` with
exponential backoff while tries are left, ``-> dead`` when they are not or the failure
is permanent (:func:`record_delivery_attempt`); a claim given up unworked is released
(:func:`release_deliveries`); an operator queues dead ones again (:func:`requeue_deliveries`).
Queueing new deliveries is :func:`gastrolens.db.transitions.queue_deliveries`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.queue import ClaimedDelivery
from gastrolens.db.states import AuditEventType, DeliveryState, Outcome
from gastrolens.db.tables import Delivery, Output
from gastrolens.db.transitions import updated_rows
from gastrolens.sending import SendOutcome, SendResult


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a delivery is retried."""

    max_attempts: int
    backoff_seconds: float
    """The delay after the first failed attempt; doubles with each further one."""
    max_backoff_seconds: float

    def delay(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed attempt."""
        return timedelta(seconds=min(self.backoff_seconds * 2 ** (attempts - 1), self.max_backoff_seconds))


_EVENTS = {
    DeliveryState.SENT: (AuditEventType.DELIVERY_SENT, Outcome.SUCCESS),
    DeliveryState.RETRYING: (AuditEventType.DELIVERY_RETRYING, Outcome.WARNING),
    DeliveryState.DEAD: (AuditEventType.DELIVERY_DEAD, Outcome.FAILURE),
}


def record_delivery_attempt(session: Session, claim: ClaimedDelivery, result: SendResult, *, worker: str,
                            policy: RetryPolicy, now: datetime) -> DeliveryState | None:
    """Record one attempt and move the delivery on: sent, retrying (backed off) or dead.

    Returns the new state, or None (nothing written) when ``worker`` no longer holds the claim.
    """
    return record_delivery_attempts(session, [(claim, result, now)], worker=worker, policy=policy)[0]


_DELIVERIES = cast(Table, Delivery.__table__)
_RECORD = (
    update(_DELIVERIES).where(_DELIVERIES.c.id == bindparam("b_id"))
    .values({name: bindparam(f"b_{name}") for name in (
        "state", "attempts", "last_status", "last_error", "claimed_by", "lease_expires_at", "sent_at",
        "next_attempt_at", "updated_at")})
)


def record_delivery_attempts(session: Session, attempts: Sequence[tuple[ClaimedDelivery, SendResult, datetime]], *,
                             worker: str, policy: RetryPolicy) -> list[DeliveryState | None]:
    """:func:`record_delivery_attempt` for each ``(claim, result, time of the result)``, in
    order, in a few statements (one read, one executemany UPDATE, one audit INSERT): each
    attempt still gets its own row update and its own audit event."""
    if not attempts:
        return []
    held = {row.id: row for row in session.execute(
        select(Delivery.id, Delivery.attempts, Delivery.destination, Delivery.sent_at, Delivery.next_attempt_at)
        .where(Delivery.id.in_([claim.id for claim, _, _ in attempts]), Delivery.claimed_by == worker))}
    states: list[DeliveryState | None] = []
    rows: list[dict[str, object]] = []
    events: list[audit.Event] = []
    for claim, result, now in attempts:
        row = held.pop(claim.id, None)  # popped: a claim listed twice is recorded once
        if row is None:
            states.append(None)
            continue
        tries, sent_at, next_attempt_at = row.attempts + 1, row.sent_at, row.next_attempt_at
        if result.outcome is SendOutcome.SENT:
            state, sent_at = DeliveryState.SENT, now
        elif result.outcome is SendOutcome.RETRY and tries < policy.max_attempts:
            state, next_attempt_at = DeliveryState.RETRYING, now + policy.delay(tries)
        else:
            state = DeliveryState.DEAD
        states.append(state)
        rows.append({"b_id": claim.id, "b_state": state, "b_attempts": tries, "b_last_status": result.status,
                     "b_last_error": result.reason, "b_claimed_by": None, "b_lease_expires_at": None,
                     "b_sent_at": sent_at, "b_next_attempt_at": next_attempt_at, "b_updated_at": now})
        event, outcome = _EVENTS[state]
        events.append(audit.Event(
            type=event, actor=worker, outcome=outcome, study_uid=claim.study_instance_uid,
            series_uid=claim.series_instance_uid, sop_uid=claim.sop_instance_uid,
            detail={"delivery_id": claim.id, "destination": row.destination, "attempt": tries,
                    "result": result.outcome.value,
                    "peer_status": None if result.status is None else f"0x{result.status:04X}",
                    "error": result.reason,
                    "next_attempt_at": next_attempt_at.isoformat() if state is DeliveryState.RETRYING else None}))
    if rows:
        session.execute(_RECORD, rows)
        audit.record_many(session, events)
    return states


def release_deliveries(session: Session, claims: Sequence[ClaimedDelivery], *, worker: str) -> int:
    """Give up claims ``worker`` still holds without an attempt (the sender stopped early).

    They are due again at once instead of after the lease. Not audited: no attempt was
    made. Returns how many were released.
    """
    if not claims:
        return 0
    released = updated_rows(session.execute(
        update(Delivery).where(Delivery.id.in_([c.id for c in claims]), Delivery.claimed_by == worker)
        .values(claimed_by=None, lease_expires_at=None)
    ))
    return released


def requeue_deliveries(session: Session, *, actor: str, now: datetime, delivery_id: int | None = None,
                       all_dead: bool = False) -> int:
    """Queue dead (or, by id, any unsent) deliveries again, each audited; returns how many."""
    stmt = select(Delivery)
    if delivery_id is not None:
        stmt = stmt.where(Delivery.id == delivery_id, Delivery.state != DeliveryState.SENT)
    elif all_dead:
        stmt = stmt.where(Delivery.state == DeliveryState.DEAD)
    else:
        return 0
    rows = list(session.scalars(stmt))
    for delivery in rows:
        previous = delivery.state
        delivery.state, delivery.attempts, delivery.next_attempt_at = DeliveryState.PENDING, 0, now
        delivery.claimed_by = delivery.lease_expires_at = None
        output = session.get(Output, delivery.output_id)
        audit.record(session, audit.Event(
            type=AuditEventType.DELIVERY_REQUEUED, actor=actor, outcome=Outcome.SUCCESS,
            sop_uid=output.sop_instance_uid if output else None,
            detail={"delivery_id": delivery.id, "destination": delivery.destination,
                    "previous_state": previous.value}))
    return len(rows)

