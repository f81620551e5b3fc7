"""Read-side queries about studies and their images: lists, a study's detail, one instance.

A study's state is derived in SQL from its current images (superseded versions do not
count) and its outputs' deliveries, so it can be filtered and paged in the database;
see :class:`~gastrolens.db.filters.StudyState` for the order in which states win.
Every value reaches SQL as a bound parameter.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, time, timezone
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, exists, func, or_, select
from sqlalchemy.orm import Session

from gastrolens.db.filters import StudyFilter, StudyQuery, StudyState, day_after
from gastrolens.db.states import DeliveryState, InstanceState
from gastrolens.db.tables import Delivery, Instance, Output, Result, Series, Study
from gastrolens.db.views import (
    DeliveryView,
    InstanceView,
    OutputView,
    Page,
    Probabilities,
    ResultView,
    StudyDetail,
    StudySummary,
)
from gastrolens.findings import CLASS_ORDER, OutputKind


def list_studies(session: Session, query: StudyQuery) -> Page[StudySummary]:
    """The studies matching ``query``, most recently received first, one page of them."""
    stmt, state = _filtered(query)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.execute(
        stmt.add_columns(state.label("state")).order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(query.limit).offset(query.offset)
    ).all()
    items = _summaries(session, rows)
    next_offset = query.offset + len(items) if query.offset + len(items) < total else None
    return Page[StudySummary](items=items, total=total, limit=query.limit, offset=query.offset, next_offset=next_offset)


def get_study(session: Session, study_uid: str) -> StudyDetail | None:
    """A study with every image version, its results, outputs and deliveries; None if unknown."""
    stmt, state = _filtered(StudyFilter(study_uid=study_uid))
    row = session.execute(stmt.add_columns(state.label("state"))).first()
    if row is None:
        return None
    summary = _summaries(session, [row])[0]
    study_id = row.Study.id
    instances = session.scalars(
        select(Instance).where(Instance.study_id == study_id)
        .order_by(Instance.series_id, Instance.received_at, Instance.id)
    ).all()
    outputs = session.scalars(select(Output).where(Output.study_id == study_id).order_by(Output.id)).all()
    views = _instance_views(session, instances, outputs, {study_id: study_uid})
    study_level = [o for o in outputs if o.instance_id is None]
    deliveries = _deliveries_by_output(session, [o.id for o in study_level])
    study_outputs = [_output_view(o, None, deliveries) for o in study_level]
    return StudyDetail(**dict(summary), instances=views, study_outputs=study_outputs)


def get_instance(session: Session, sop_uid: str) -> InstanceView | None:
    """The latest version of a received image with its results and outputs; None if unknown."""
    instance = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_uid).order_by(Instance.version.desc()).limit(1)
    ).first()
    if instance is None:
        return None
    study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == instance.study_id))
    outputs = session.scalars(select(Output).where(Output.instance_id == instance.id).order_by(Output.id)).all()
    return _instance_views(session, [instance], outputs, {instance.study_id: study_uid or ""})[0]


# -- the filtered study statement ------------------------------------------------------------

_QUEUED = (InstanceState.RECEIVED, InstanceState.CLAIMED)
_ACTIVE_DELIVERY = (DeliveryState.PENDING, DeliveryState.RETRYING)


def study_match(flt: StudyFilter) -> ColumnElement[bool]:
    """``flt`` as one condition on ``Study``, for other read-side queries (Query/Retrieve)."""
    stmt, _ = _filtered(flt)
    return Study.id.in_(stmt.with_only_columns(Study.id))


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[Any]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _n(column: Any) -> ColumnElement[Any]:
    """0 for a study the outer join found no counts for (no deliveries yet, say)."""
    return func.coalesce(column, 0)


def _filtered(flt: StudyFilter) -> tuple[Select[Any], ColumnElement[str]]:
    """``SELECT Study, counts... WHERE filter`` and the derived state expression."""
    images = (
        select(
            Instance.study_id.label("study_id"),
            func.count(Instance.id).label("images"),
            _count_if(Instance.state == InstanceState.DONE).label("done"),
            _count_if(Instance.state == InstanceState.FAILED).label("failed"),
            _count_if(Instance.state.in_(_QUEUED)).label("queued"),
        )
        .where(Instance.superseded.is_(False))
        .group_by(Instance.study_id)
        .subquery("image_counts")
    )
    sends = (
        select(
            Output.study_id.label("study_id"),
            _count_if(Delivery.state == DeliveryState.DEAD).label("dead"),
            _count_if(Delivery.state.in_(_ACTIVE_DELIVERY)).label("active"),
        )
        .join(Delivery, Delivery.output_id == Output.id)
        .group_by(Output.study_id)
        .subquery("delivery_counts")
    )
    state = case(
        (_n(images.c.queued) > 0, StudyState.QUEUED.value),
        (_n(images.c.failed) > 0, StudyState.FAILED.value),
        (_n(sends.c.dead) > 0, StudyState.DELIVERY_DEAD.value),
        (_n(sends.c.active) > 0, StudyState.DELIVERING.value),
        (Study.report_revision == 0, StudyState.AWAITING_REPORT.value),
        else_=StudyState.COMPLETE.value,
    )
    stmt = (
        select(Study, _n(images.c.images).label("images"), _n(images.c.done).label("done"),
               _n(images.c.failed).label("failed"), _n(images.c.queued).label("queued"))
        .outerjoin(images, images.c.study_id == Study.id)
        .outerjoin(sends, sends.c.study_id == Study.id)
    )
    for condition in _conditions(flt, state):
        stmt = stmt.where(condition)
    return stmt, state


def _conditions(flt: StudyFilter, state: ColumnElement[str]) -> Iterable[ColumnElement[bool]]:
    if flt.study_uid is not None:
        yield Study.study_instance_uid == flt.study_uid
    if flt.patient_id is not None:
        yield Study.patient_id == flt.patient_id
    if flt.accession_number is not None:
        yield Study.accession_number == flt.accession_number
    if flt.date_from is not None or flt.date_to is not None:
        yield _date_range(flt)
    if flt.finding is not None:
        seen = exists(
            select(Result.id).join(Instance, Result.instance_id == Instance.id)
            .where(Instance.study_id == Study.id, Instance.superseded.is_(False),
                   Result.predicted_class == flt.finding.value)
        )
        yield or_(Study.conclusion == flt.finding.value, seen)
    if flt.state is not None:
        yield state == flt.state.value


def _date_range(flt: StudyFilter) -> ColumnElement[bool]:
    """Study Date (YYYYMMDD sorts as text) when present, else the day of first arrival (UTC)."""
    by_date: list[ColumnElement[bool]] = [Study.study_date.is_not(None), Study.study_date != ""]
    by_arrival: list[ColumnElement[bool]] = [or_(Study.study_date.is_(None), Study.study_date == "")]
    if flt.date_from is not None:
        by_date.append(Study.study_date >= flt.date_from.strftime("%Y%m%d"))
        by_arrival.append(Study.first_received_at >= datetime.combine(flt.date_from, time(), timezone.utc))
    if flt.date_to is not None:
        by_date.append(Study.study_date <= flt.date_to.strftime("%Y%m%d"))
        by_arrival.append(Study.first_received_at < day_after(flt.date_to))
    return or_(and_(*by_date), and_(*by_arrival))


# -- building views ----------------------------------------------------------------------------


def _summaries(session: Session, rows: Sequence[Any]) -> list[StudySummary]:
    ids = [r.Study.id for r in rows]
    findings, untrained = _findings(session, ids)
    sends: dict[int, dict[str, int]] = defaultdict(dict)
    if ids:
        for study_id, state, count in session.execute(
            select(Output.study_id, Delivery.state, func.count(Delivery.id))
            .join(Delivery, Delivery.output_id == Output.id)
            .where(Output.study_id.in_(ids)).group_by(Output.study_id, Delivery.state)
        ):
            sends[study_id][DeliveryState(state).value] = count
    out = []
    for r in rows:
        s: Study = r.Study
        out.append(StudySummary(
            study_instance_uid=s.study_instance_uid, patient_id=s.patient_id, patient_name=s.patient_name,
            accession_number=s.accession_number, study_date=s.study_date, study_description=s.study_description,
            first_received_at=utc(s.first_received_at), last_received_at=utc(s.last_received_at),
            state=StudyState(r.state), conclusion=s.conclusion, report_revision=s.report_revision,
            reported_at=utc(s.reported_at), images=r.images, images_done=r.done, images_failed=r.failed,
            images_queued=r.queued, findings=dict(findings.get(s.id, {})), deliveries=sends.get(s.id, {}),
            untrained=s.id in untrained,
        ))
    return out


def _findings(session: Session, study_ids: list[int]) -> tuple[dict[int, Counter[str]], set[int]]:
    """Per study: frames per class from each frame's current result; studies with untrained results."""
    if not study_ids:
        return {}, set()
    rows = session.execute(
        select(Instance.study_id, Result.instance_id, Result.frame_number, Result.predicted_class, Result.untrained)
        .join(Instance, Result.instance_id == Instance.id)
        .where(Instance.study_id.in_(study_ids), Instance.superseded.is_(False))
        .order_by(Result.created_at, Result.id)
    ).all()
    current: dict[tuple[int, int], tuple[int, str, bool]] = {}
    for study_id, instance_id, frame, predicted, untrained in rows:
        current[(instance_id, frame)] = (study_id, predicted, untrained)
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    flagged: set[int] = set()
    for study_id, predicted, untrained in current.values():
        counts[study_id][predicted] += 1
        if untrained:
            flagged.add(study_id)
    return counts, flagged


def _instance_views(session: Session, instances: Sequence[Instance], outputs: Sequence[Output],
                    study_uids: dict[int, str]) -> list[InstanceView]:
    ids = [i.id for i in instances]
    series = dict(session.execute(
        select(Series.id, Series.series_instance_uid).where(Series.id.in_({i.series_id for i in instances}))
    ).all()) if instances else {}
    results: dict[int, list[Result]] = defaultdict(list)
    if ids:
        for result in session.scalars(
            select(Result)
            .where(Result.instance_id.in_(ids))
            .order_by(Result.frame_number, Result.created_at, Result.id)
        ):
            results[result.instance_id].append(result)
    deliveries = _deliveries_by_output(session, [o.id for o in outputs])
    by_source: dict[int, list[OutputView]] = defaultdict(list)
    sop_of = {i.id: i.sop_instance_uid for i in instances}
    for o in outputs:
        if o.instance_id is not None:
            by_source[o.instance_id].append(_output_view(o, sop_of.get(o.instance_id), deliveries))
    return [
        InstanceView(
            sop_instance_uid=i.sop_instance_uid,
            version=i.version,
            superseded=i.superseded,
            study_uid=study_uids.get(i.study_id, ""),
            series_uid=series.get(i.series_id, ""),
            sop_class_uid=i.sop_class_uid,
            state=i.state,
            attempts=i.attempts,
            error=i.error,
            quirks=list(i.quirks or ()),
            received_at=utc(i.received_at),
            finished_at=utc(i.finished_at),
            removed_at=utc(i.removed_at),
            results=_result_views(results.get(i.id, [])),
            outputs=by_source.get(i.id, []),
        )
        for i in instances
    ]


def _result_views(results: list[Result]) -> list[ResultView]:
    latest: dict[int, int] = {}
    for r in results:  # ordered by created_at within each frame: the last one wins
        latest[r.frame_number] = r.id
    return [
        ResultView(
            frame_number=r.frame_number,
            probabilities=Probabilities(**{c.value: p for c, p in zip(CLASS_ORDER, r.probabilities, strict=True)}),
            predicted_class=r.predicted_class,
            lesion_present=r.lesion_present,
            lesion_area_fraction=r.lesion_area_fraction,
            bbox=list(r.bbox) if r.bbox is not None else None,
            model_name=r.model_name,
            model_version=r.model_version,
            model_sha256=r.model_sha256,
            untrained=r.untrained,
            current=latest[r.frame_number] == r.id,
            created_at=utc(r.created_at),
        )
        for r in results
    ]


def _deliveries_by_output(session: Session, output_ids: list[int]) -> dict[int, list[DeliveryView]]:
    found: dict[int, list[DeliveryView]] = defaultdict(list)
    if not output_ids:
        return found
    for d in session.scalars(select(Delivery).where(Delivery.output_id.in_(output_ids)).order_by(Delivery.destination)):
        found[d.output_id].append(delivery_view(d))
    return found


def delivery_view(d: Delivery) -> DeliveryView:
    return DeliveryView(
        id=d.id,
        destination=d.destination,
        state=d.state,
        attempts=d.attempts,
        last_status=d.last_status,
        last_error=d.last_error,
        next_attempt_at=utc(d.next_attempt_at),
        updated_at=utc(d.updated_at),
        sent_at=utc(d.sent_at),
    )


def _output_view(o: Output, source_sop_uid: str | None, deliveries: dict[int, list[DeliveryView]]) -> OutputView:
    return OutputView(
        kind=o.kind,
        sop_instance_uid=o.sop_instance_uid,
        series_instance_uid=o.series_instance_uid,
        sop_class_uid=o.sop_class_uid,
        source_sop_uid=source_sop_uid,
        file_path=o.file_path,
        revision=o.revision,
        model_sha256=o.model_sha256,
        created_at=utc(o.created_at),
        removed_at=utc(o.removed_at),
        deliveries=deliveries.get(o.id, []),
    )


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything is stored in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def overlay_file(session: Session, sop_uid: str) -> str | None:
    """The stored path (relative to the storage root) of an overlay output, None if unknown or removed."""
    return session.scalar(
        select(Output.file_path).where(
            Output.sop_instance_uid == sop_uid, Output.kind == OutputKind.OVERLAY, Output.removed_at.is_(None)
        )
    )
