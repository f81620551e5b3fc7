"""Read-side queries about what is stuck: deliveries waiting, retrying or dead, and failed images."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gastrolens.db.filters import DeliveryQuery
from gastrolens.db.queries_studies import delivery_view, utc
from gastrolens.db.states import DeliveryState, InstanceState
from gastrolens.db.tables import Delivery, Instance, Output, Study
from gastrolens.db.views import FailedInstanceView, Page, QueueDeliveryView
from gastrolens.sending import describe_status


def list_deliveries(session: Session, query: DeliveryQuery,
                    kinds: Mapping[str, str] | None = None) -> Page[QueueDeliveryView]:
    """Deliveries matching ``query``, most recently changed first, one page of them.

    ``kinds`` maps destination names to their kind (the configuration's
    :meth:`~gastrolens.config.schema.Settings.destination_kinds`); the database keeps names only.
    """
    kinds = kinds or {}
    stmt = (
        select(Delivery, Output.kind, Output.sop_instance_uid, Study.study_instance_uid, Instance.sop_instance_uid)
        .join(Output, Delivery.output_id == Output.id)
        .join(Study, Output.study_id == Study.id)
        .outerjoin(Instance, Output.instance_id == Instance.id)
    )
    if query.state is not None:
        stmt = stmt.where(Delivery.state == query.state)
    if query.destination is not None:
        stmt = stmt.where(Delivery.destination == query.destination)
    if query.study_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == query.study_uid)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.execute(
        stmt.order_by(Delivery.updated_at.desc(), Delivery.id.desc()).limit(query.limit).offset(query.offset)
    ).all()
    items = [
        QueueDeliveryView(**dict(delivery_view(d)), output_kind=kind, output_sop_uid=output_uid,
                          study_uid=study_uid, source_sop_uid=source_uid, destination_kind=kinds.get(d.destination),
                          last_status_text=describe_status(kinds.get(d.destination), d.last_status))
        for d, kind, output_uid, study_uid, source_uid in rows
    ]
    end = query.offset + len(items)
    return Page[QueueDeliveryView](items=items, total=total, limit=query.limit, offset=query.offset,
                                   next_offset=end if end < total else None)


def delivery_counts(session: Session, kinds: Mapping[str, str]) -> dict[tuple[str, str], int]:
    """Deliveries by (destination kind, state); a destination no longer configured counts as kind "unknown"."""
    counts: dict[tuple[str, str], int] = {}
    rows = session.execute(select(Delivery.destination, Delivery.state, func.count()).group_by(
        Delivery.destination, Delivery.state))
    for destination, state, n in rows:
        key = (kinds.get(destination, "unknown"), DeliveryState(state).value)
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def failed_instances(session: Session, limit: int = 50) -> list[FailedInstanceView]:
    """The most recently failed current images, with their error."""
    rows = session.execute(
        select(Instance, Study.study_instance_uid)
        .join(Study, Instance.study_id == Study.id)
        .where(Instance.state == InstanceState.FAILED, Instance.superseded.is_(False))
        .order_by(Instance.finished_at.desc(), Instance.id.desc())
        .limit(limit)
    ).all()
    return [
        FailedInstanceView(sop_instance_uid=i.sop_instance_uid, version=i.version, study_uid=study_uid,
                           attempts=i.attempts, error=i.error, received_at=utc(i.received_at),
                           finished_at=utc(i.finished_at))
        for i, study_uid in rows
    ]
