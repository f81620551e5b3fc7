"""The instance and study state machines: every transition after a claim, each with its audit event.

An instance goes ``claimed -> done`` (:func:`finish_instance`), ``claimed -> failed``
(:func:`fail_instance`) or back to ``received`` (:func:`release_instances`); each only
while the worker still holds the claim, so an instance gets exactly one set of results
even when a lease expired under a slow worker. A study's report revision advances by
compare-and-set (:func:`record_study_report`). Every new output gets one delivery per
destination (:func:`queue_deliveries`). These functions are the only writers of those
columns; the daemon's steps claim, work, and call one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, insert, select, update
from sqlalchemy.orm import Session

from gastrolens.db import audit
from gastrolens.db.engine import on_postgresql
from gastrolens.db.queue import ClaimedInstance
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState, Outcome
from gastrolens.db.tables import Delivery, Instance, Output, Result, Study, probability_values
from gastrolens.findings import ImageFinding, ModelIdentity, OutputKind


@dataclass(frozen=True, kw_only=True)
class NewOutput:
    """An output file written to the store, as the database records it."""

    kind: OutputKind
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    file_path: str
    """Relative to the storage root."""


def _hold(session: Session, claim: ClaimedInstance, worker: str) -> Instance | None:
    """The instance if ``worker`` still holds its claim (locked for the rest of the transaction)."""
    stmt = select(Instance).where(Instance.id == claim.id, Instance.state == InstanceState.CLAIMED,
                                  Instance.claimed_by == worker)
    if on_postgresql(session):
        stmt = stmt.with_for_update()
    return session.scalars(stmt).first()


def _holds(session: Session, claim: ClaimedInstance, worker: str) -> bool:
    """:func:`_hold` without loading the row into the session (a plain SELECT of the id)."""
    stmt = select(Instance.id).where(Instance.id == claim.id, Instance.state == InstanceState.CLAIMED,
                                     Instance.claimed_by == worker)
    if on_postgresql(session):
        stmt = stmt.with_for_update()
    return session.execute(stmt).first() is not None


def _event(claim: ClaimedInstance, **fields: Any) -> audit.Event:
    return audit.Event(study_uid=claim.study_instance_uid, series_uid=claim.series_instance_uid,
                       sop_uid=claim.sop_instance_uid, **fields)


def finish_instance(session: Session, claim: ClaimedInstance, *, worker: str, findings: Sequence[ImageFinding],
                    outputs: Sequence[NewOutput], destinations: Sequence[str], now: datetime,
                    quirks: Sequence[str] = (), image_size: tuple[int, int] | None = None) -> bool:
    """``claimed -> done``: results, outputs, their deliveries and the audit events, in ``session``.

    ``quirks`` (what was wrong with the source and how it was read anyway) are kept on the
    instance and named in its audit event; so is ``image_size`` (rows, columns), which a
    study SR needs once retention removed the source. False (and nothing written) when ``worker`` no
    longer holds the claim.

    Core statements, a few per image whatever its outputs and destinations (results,
    new outputs and their deliveries each in one INSERT, the audit events in one): this
    runs for every image, on the path a GPU host must keep fed.
    """
    if not _holds(session, claim, worker):
        return False
    if not findings:
        raise ValueError(f"instance {claim.sop_instance_uid}: no findings to record")
    model = findings[0].model
    session.execute(insert(Result), [result_values(claim.id, frame_number, finding, now=now)
                                     for frame_number, finding in enumerate(findings, start=1)])
    events = _record_outputs(session, claim, outputs, model, worker=worker, destinations=destinations, now=now)
    done: dict[str, Any] = {"state": InstanceState.DONE, "finished_at": now, "claimed_by": None,
                            "lease_expires_at": None, "error": None, "quirks": list(quirks) or None}
    if image_size is not None:
        done["rows"], done["columns"] = (int(n) for n in image_size)
    session.execute(update(Instance).where(Instance.id == claim.id).values(**done)
                    .execution_options(synchronize_session=False))
    events.append(_event(
        claim, type=AuditEventType.INSTANCE_DONE, actor=worker, outcome=Outcome.WARNING if quirks else Outcome.SUCCESS,
        detail={"instance_id": claim.id, "frames": len(findings),
                "predicted": sorted({f.predicted.value for f in findings}),
                "model": model.name, "model_version": model.version, "weights_sha256": model.weights_sha256,
                "untrained": model.untrained, **({"quirks": list(quirks)} if quirks else {})}))
    audit.record_many(session, events)
    return True


def fail_instance(session: Session, claim: ClaimedInstance, *, worker: str, reason: str, now: datetime) -> bool:
    """``claimed -> failed`` with ``reason``; False when ``worker`` no longer holds the claim."""
    instance = _hold(session, claim, worker)
    if instance is None:
        return False
    instance.state = InstanceState.FAILED
    instance.error = reason
    instance.finished_at = now
    instance.claimed_by = instance.lease_expires_at = None
    audit.record(session, _event(claim, type=AuditEventType.INSTANCE_FAILED, actor=worker, outcome=Outcome.FAILURE,
                                 detail={"instance_id": claim.id, "reason": reason}))
    return True


def release_instances(session: Session, claims: Sequence[ClaimedInstance], *, worker: str) -> int:
    """``claimed -> received`` for claims ``worker`` still holds but will not work on (shutting down).

    The next claim takes them at once instead of after the lease. Not audited: the claim
    was, and the next claim is again. Returns how many were released.
    """
    if not claims:
        return 0
    released = updated_rows(session.execute(
        update(Instance)
        .where(Instance.id.in_([c.id for c in claims]), Instance.state == InstanceState.CLAIMED,
               Instance.claimed_by == worker)
        .values(state=InstanceState.RECEIVED, claimed_by=None, lease_expires_at=None)
    ))
    return released


def result_values(instance_id: int, frame_number: int, finding: ImageFinding, *, now: datetime) -> dict[str, Any]:
    """The column values of the ``results`` row of one frame's finding."""
    return dict(
        instance_id=instance_id, frame_number=frame_number,
        **probability_values(finding.probabilities),
        predicted_class=finding.predicted.value, lesion_present=finding.lesion_present,
        lesion_area_fraction=finding.lesion_area_fraction,
        bbox=list(finding.bbox) if finding.bbox is not None else None,
        model_name=finding.model.name, model_version=finding.model.version,
        model_sha256=finding.model.weights_sha256, untrained=finding.model.untrained,
        timings=dict(finding.timings), created_at=now,
    )


def _record_outputs(session: Session, claim: ClaimedInstance, outputs: Sequence[NewOutput], model: ModelIdentity, *,
                    worker: str, destinations: Sequence[str], now: datetime) -> list[audit.Event]:
    """Insert new outputs with one pending delivery per destination, update replaced ones
    (the same UID: the image was processed again) and queue them again; returns their
    ``output.written`` events, in order, for the caller to record."""
    if not outputs:
        return []
    uids = [new.sop_instance_uid for new in outputs]
    existing = dict(session.execute(select(Output.sop_instance_uid, Output.id)
                                    .where(Output.sop_instance_uid.in_(uids))).all())
    fresh = [new for new in outputs if new.sop_instance_uid not in existing]
    if fresh:
        ids = dict(session.execute(
            insert(Output).returning(Output.sop_instance_uid, Output.id),
            [{"kind": new.kind, "study_id": claim.study_id, "instance_id": claim.id,
              "sop_instance_uid": new.sop_instance_uid, "series_instance_uid": new.series_instance_uid,
              "sop_class_uid": new.sop_class_uid, "file_path": new.file_path, "model_sha256": model.weights_sha256,
              "created_at": now, "removed_at": None} for new in fresh]).all())
        if destinations:
            session.execute(insert(Delivery), [
                {"output_id": ids[new.sop_instance_uid], "destination": name, "state": DeliveryState.PENDING,
                 "attempts": 0, "next_attempt_at": now, "updated_at": now} for new in fresh for name in destinations])
    for new in outputs:
        output_id = existing.get(new.sop_instance_uid)
        if output_id is not None:
            session.execute(update(Output).where(Output.id == output_id).values(
                series_instance_uid=new.series_instance_uid, sop_class_uid=new.sop_class_uid,
                file_path=new.file_path, instance_id=claim.id, removed_at=None)
                .execution_options(synchronize_session=False))
            queue_deliveries(session, output_id, destinations, now=now)
    return [audit.Event(
        type=AuditEventType.OUTPUT_WRITTEN, actor=worker, outcome=Outcome.SUCCESS, study_uid=claim.study_instance_uid,
        series_uid=new.series_instance_uid, sop_uid=new.sop_instance_uid,
        detail={"kind": new.kind.value, "source_sop_uid": claim.sop_instance_uid, "path": new.file_path,
                **({"note": "replaces an earlier output with the same UID"} if new.sop_instance_uid in existing
                   else {})}) for new in outputs]


def queue_deliveries(session: Session, output_id: int, destinations: Sequence[str], *, now: datetime) -> int:
    """One ``pending`` delivery of the output per destination; a replaced output is sent again.

    Not audited on its own: the output.written or study.reported event of the same
    transaction says the output exists, and each attempt is audited. Returns how many
    deliveries were queued or queued again.
    """
    existing = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.output_id == output_id))}
    queued = 0
    for name in destinations:
        delivery = existing.get(name)
        if delivery is None:
            session.add(Delivery(output_id=output_id, destination=name, state=DeliveryState.PENDING,
                                 attempts=0, next_attempt_at=now, updated_at=now))
            queued += 1
        elif delivery.state is not DeliveryState.PENDING:
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = now
            delivery.claimed_by = delivery.lease_expires_at = None
            queued += 1
    return queued


@dataclass(frozen=True, kw_only=True)
class StudyReport:
    """Revision ``revision`` of a study's SR, written to the store."""

    study_id: int
    study_instance_uid: str
    revision: int
    output: NewOutput
    conclusion: str
    """A LesionClass value."""
    reported: Sequence[str]
    images: int
    models: Sequence[ModelIdentity]
    """Every model whose findings the report covers, the one of the newest finding last."""
    predecessor_sop_uid: str | None = None


def record_study_report(session: Session, report: StudyReport, *, worker: str, destinations: Sequence[str],
                        now: datetime) -> bool:
    """Advance the study to ``report.revision`` (compare-and-set), record the SR, queue it, audit it.

    False (nothing written) when another worker reported this revision first.
    """
    advanced = updated_rows(session.execute(
        update(Study).where(Study.id == report.study_id, Study.report_revision == report.revision - 1)
        .values(report_revision=report.revision, reported_at=now, conclusion=report.conclusion)
    ))
    if advanced != 1:
        return False
    new = report.output
    output = Output(kind=OutputKind.STUDY_SR, study_id=report.study_id, instance_id=None,
                    sop_instance_uid=new.sop_instance_uid, series_instance_uid=new.series_instance_uid,
                    sop_class_uid=new.sop_class_uid, file_path=new.file_path, revision=report.revision,
                    model_sha256=report.models[-1].weights_sha256, created_at=now)
    session.add(output)
    session.flush()
    queue_deliveries(session, output.id, destinations, now=now)
    audit.record(session, audit.Event(
        type=AuditEventType.STUDY_REPORTED, actor=worker, outcome=Outcome.SUCCESS,
        study_uid=report.study_instance_uid, series_uid=new.series_instance_uid, sop_uid=new.sop_instance_uid,
        detail={"revision": report.revision, "conclusion": report.conclusion, "reported": list(report.reported),
                "images": report.images, "predecessor": report.predecessor_sop_uid,
                "models": [{"name": m.name, "version": m.version, "weights_sha256": m.weights_sha256}
                           for m in report.models]}))
    return True


def updated_rows(result: Any) -> int:
    """Rows an UPDATE matched (``Session.execute`` types its result without ``rowcount``)."""
    return int(cast(CursorResult[Any], result).rowcount or 0)
