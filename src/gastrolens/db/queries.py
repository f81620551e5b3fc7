"""Read-side queries: counts for `gastrolens status`, lists for the CLI and the API."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gastrolens.db.states import DeliveryState, InstanceState
from gastrolens.db.tables import Delivery, Instance, Quarantined, Result


def status_counts(session: Session) -> dict[str, Any]:
    """The shape `gastrolens status --json` promises (design.md), plus throughput."""
    instances = {s.value: 0 for s in InstanceState}
    for state, n in session.execute(select(Instance.state, func.count()).group_by(Instance.state)):
        instances[InstanceState(state).value] = n
    outputs = {s.value: 0 for s in DeliveryState}
    for delivery_state, n in session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
        outputs[DeliveryState(delivery_state).value] = n
    quarantined = session.scalar(select(func.count()).select_from(Quarantined)) or 0
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    recent = session.scalar(select(func.count()).select_from(Result).where(Result.created_at >= since)) or 0
    return {
        "instances": instances,
        "quarantined": quarantined,
        "outputs": outputs,
        "queue_depth": instances[InstanceState.RECEIVED.value] + instances[InstanceState.CLAIMED.value],
        "images_per_minute_last_5_min": round(recent / 5.0, 2),
    }
