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

from sqlalchemy import select, update
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
    delivery = session.get(Delivery, claim.id)
    if delivery is None or delivery.claimed_by != worker:
        return None
    delivery.attempts += 1
    delivery.last_status = result.status
    delivery.last_error = result.reason
    delivery.claimed_by = delivery.lease_expires_at = None
    if result.outcome is SendOutcome.SENT:
        delivery.state, delivery.sent_at = DeliveryState.SENT, now
    elif result.outcome is SendOutcome.RETRY and delivery.attempts < policy.max_attempts:
        delivery.state, delivery.next_attempt_at = DeliveryState.RETRYING, now + policy.delay(delivery.attempts)
    else:
        delivery.state = DeliveryState.DEAD
    event, outcome = _EVENTS[delivery.state]
    audit.record(session, audit.Event(
        type=event, actor=worker, outcome=outcome, study_uid=claim.study_instance_uid,
        series_uid=claim.series_instance_uid, sop_uid=claim.sop_instance_uid,
        detail={"delivery_id": delivery.id, "destination": delivery.destination, "attempt": delivery.attempts,
                "result": result.outcome.value,
                "peer_status": None if result.status is None else f"0x{result.status:04X}",
                "error": result.reason,
                "next_attempt_at": (delivery.next_attempt_at.isoformat()
                                    if delivery.state is DeliveryState.RETRYING else None)}))
    return delivery.state


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

