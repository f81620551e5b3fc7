"""The instance, study and delivery state machines: each transition, its audit event, and the lost claim.

Leases expire by passing ``now``, never by sleeping.
"""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, select, update

from gastrolens.db import Database, audit
from gastrolens.db.queue import claim_deliveries, claim_instances
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState
from gastrolens.db.tables import AuditEvent, Delivery, Instance, Output, Result, Series, Study, utcnow
from gastrolens.db.transitions import (
    NewOutput,
    StudyReport,
    fail_instance,
    finish_instance,
    queue_deliveries,
    record_study_report,
    release_instances,
)
from gastrolens.db.transitions_delivery import (
    RetryPolicy,
    record_delivery_attempt,
    record_delivery_attempts,
    release_deliveries,
    requeue_deliveries,
)
from gastrolens.findings import CLASS_ORDER, ImageFinding, LesionClass, ModelIdentity, OutputKind
from gastrolens.sending import permanent, retry, sent

MODEL = ModelIdentity("test-model", "1", "a" * 64, untrained=True)
POLICY = RetryPolicy(max_attempts=3, backoff_seconds=10, max_backoff_seconds=25)
T0 = utcnow()


@pytest.fixture
def db(db_url):
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


def add_instances(db: Database, n: int) -> list[int]:
    with db.session() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(series_instance_uid="1.2.3.4", study_id=study.id)
        s.add(series)
        s.flush()
        rows = [Instance(sop_instance_uid=f"1.2.3.4.{i}", series_id=series.id, study_id=study.id,
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.7", transfer_syntax_uid="1.2.840.10008.1.2.1",
                         file_path=f"in/{i}.dcm", sha256="0" * 64, size_bytes=1, received_at=T0 + timedelta(seconds=i))
                for i in range(n)]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def finding(probabilities=(0.1, 0.2, 0.3, 0.15, 0.25)) -> ImageFinding:
    return ImageFinding(probabilities=probabilities, predicted=LesionClass.EGC_HGIN, lesion_present=True,
                        mask=np.zeros((2, 2), bool), lesion_area_fraction=0.1, bbox=(0, 0, 1, 1), model=MODEL)


def output(uid: str = "1.2.9.1") -> NewOutput:
    return NewOutput(kind=OutputKind.SR, sop_instance_uid=uid, series_instance_uid="1.2.9",
                     sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", file_path=f"outputs/{uid}.dcm")


def audit_types(db: Database) -> list[str]:
    with db.session() as s:
        return [t.value for t in s.scalars(select(AuditEvent.event_type).order_by(AuditEvent.id))]


def test_a_lease_expires_by_the_callers_clock(db):
    add_instances(db, 1)
    with db.session() as s:
        assert len(claim_instances(s, "a", limit=5, lease_seconds=60, now=T0)) == 1
    with db.session() as s:
        assert claim_instances(s, "b", limit=5, lease_seconds=60, now=T0 + timedelta(seconds=59)) == []
    with db.session() as s:
        (again,) = claim_instances(s, "b", limit=5, lease_seconds=60, now=T0 + timedelta(seconds=61))
    assert again.attempts == 2
    assert audit_types(db) == ["instance.claimed", "instance.reclaimed"]


def test_finish_writes_results_outputs_deliveries_and_done_once(db):
    add_instances(db, 1)
    with db.session() as s:
        (claim,) = claim_instances(s, "a", limit=1, lease_seconds=60, now=T0)
    with db.session() as s:
        assert finish_instance(s, claim, worker="a", findings=[finding()], outputs=[output()],
                               destinations=["pacs", "export"], now=T0)
    with db.session() as s:
        instance = s.get(Instance, claim.id)
        assert (instance.state, instance.claimed_by, instance.lease_expires_at) == (InstanceState.DONE, None, None)
        assert s.scalar(select(func.count()).select_from(Result)) == 1
        assert sorted(s.scalars(select(Delivery.destination))) == ["export", "pacs"]
        assert {d.state for d in s.scalars(select(Delivery))} == {DeliveryState.PENDING}
    assert audit_types(db)[-2:] == ["output.written", "instance.done"]
    with db.session() as s:  # a second finish of the same claim: the claim is gone
        assert not finish_instance(s, claim, worker="a", findings=[finding()], outputs=[], destinations=[], now=T0)
        assert not fail_instance(s, claim, worker="a", reason="late", now=T0)


def test_result_columns_follow_class_order(db):
    add_instances(db, 1)
    distinct = (0.01, 0.02, 0.03, 0.04, 0.90)
    with db.session() as s:
        (claim,) = claim_instances(s, "a", limit=1, lease_seconds=60, now=T0)
        finish_instance(s, claim, worker="a", findings=[finding(distinct)], outputs=[], destinations=[], now=T0)
    with db.session() as s:
        result = s.scalars(select(Result)).one()
        assert result.probabilities == pytest.approx(distinct)
        assert result.p_smt == pytest.approx(0.90) and CLASS_ORDER[-1] is LesionClass.SMT


def test_fail_and_release(db):
    first, second = add_instances(db, 2)
    with db.session() as s:
        claims = claim_instances(s, "a", limit=2, lease_seconds=60, now=T0)
    with db.session() as s:
        assert fail_instance(s, claims[0], worker="a", reason="cannot decode: truncated", now=T0)
        assert release_instances(s, claims, worker="a") == 1, "only the one still claimed"
        assert release_instances(s, claims, worker="b") == 0
    with db.session() as s:
        assert s.get(Instance, first).state is InstanceState.FAILED
        assert s.get(Instance, first).error == "cannot decode: truncated"
        assert (s.get(Instance, second).state, s.get(Instance, second).claimed_by) == (InstanceState.RECEIVED, None)
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.INSTANCE_FAILED)).one()
        assert json.loads(event.detail)["reason"] == "cannot decode: truncated"
    with db.session() as s:  # released: claimable at once, not after the lease
        assert [c.id for c in claim_instances(s, "b", limit=2, lease_seconds=60, now=T0)] == [second]


def deliveries(db: Database, destinations=("pacs",), outputs: int = 1) -> None:
    add_instances(db, 1)
    with db.session() as s:
        (claim,) = claim_instances(s, "a", limit=1, lease_seconds=60, now=T0)
        finish_instance(s, claim, worker="a", findings=[finding()],
                        outputs=[output(f"1.2.9.{i}") for i in range(outputs)], destinations=list(destinations), now=T0)


def claim_one(db: Database, worker: str, now, **where):
    with db.session() as s:
        return claim_deliveries(s, worker, limit=10, lease_seconds=60, now=now, **where)


def test_delivery_sent(db):
    deliveries(db)
    (claim,) = claim_one(db, "a", T0)
    assert claim.file_path == "outputs/1.2.9.0.dcm" and claim.study_instance_uid == "1.2.3"
    with db.session() as s:
        assert record_delivery_attempt(s, claim, sent(0), worker="a", policy=POLICY, now=T0) is DeliveryState.SENT
    with db.session() as s:
        d = s.get(Delivery, claim.id)
        assert (d.state, d.attempts, d.last_status, d.claimed_by) == (DeliveryState.SENT, 1, 0, None)
    assert audit_types(db)[-1] == "delivery.sent"


def test_retry_backs_off_then_dies(db):
    deliveries(db)
    now = T0
    states = []
    for _ in range(POLICY.max_attempts):
        (claim,) = claim_one(db, "a", now)
        with db.session() as s:
            states.append(record_delivery_attempt(s, claim, retry("no response"), worker="a", policy=POLICY, now=now))
            next_at = s.get(Delivery, claim.id).next_attempt_at
        assert claim_one(db, "a", now) == [], "not due before its backoff"
        now = next_at.replace(tzinfo=now.tzinfo) if next_at.tzinfo is None else next_at
    assert states == [DeliveryState.RETRYING, DeliveryState.RETRYING, DeliveryState.DEAD]
    assert POLICY.delay(1) == timedelta(seconds=10) and POLICY.delay(3) == timedelta(seconds=25)
    assert audit_types(db)[-3:] == ["delivery.retrying", "delivery.retrying", "delivery.dead"]


def test_a_permanent_failure_is_dead_at_once_and_can_be_requeued(db):
    deliveries(db)
    (claim,) = claim_one(db, "a", T0)
    with db.session() as s:
        assert record_delivery_attempt(s, claim, permanent("peer answered 0xA900", 0xA900), worker="a",
                                       policy=POLICY, now=T0) is DeliveryState.DEAD
    with db.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.DELIVERY_DEAD)).one()
        assert json.loads(event.detail)["peer_status"] == "0xA900"
        assert requeue_deliveries(s, actor="cli:test", now=T0, all_dead=True) == 1
    assert [c.id for c in claim_one(db, "a", T0)] == [claim.id]


def test_a_late_worker_records_nothing(db):
    deliveries(db)
    (claim,) = claim_one(db, "a", T0)
    assert claim_one(db, "b", T0 + timedelta(seconds=30)) == []
    (again,) = claim_one(db, "b", T0 + timedelta(seconds=61))
    with db.session() as s:
        assert record_delivery_attempt(s, claim, sent(0), worker="a", policy=POLICY, now=T0) is None
        assert record_delivery_attempt(s, again, sent(0), worker="b", policy=POLICY, now=T0) is DeliveryState.SENT


def test_claims_by_destination_and_release(db):
    deliveries(db, destinations=("pacs", "export", "gone"), outputs=2)
    pacs = claim_one(db, "a", T0, destination="pacs")
    assert {c.destination for c in pacs} == {"pacs"} and len(pacs) == 2
    orphans = claim_one(db, "a", T0, unknown_to=["pacs", "export"])
    assert {c.destination for c in orphans} == {"gone"} and len(orphans) == 2
    with db.session() as s:
        assert release_deliveries(s, pacs, worker="a") == 2
    assert len(claim_one(db, "b", T0, destination="pacs")) == 2, "released claims are due at once"


def test_queue_deliveries_sends_a_replaced_output_again(db):
    deliveries(db)
    (claim,) = claim_one(db, "a", T0)
    with db.session() as s:
        record_delivery_attempt(s, claim, sent(0), worker="a", policy=POLICY, now=T0)
    with db.session() as s:
        output_id = s.scalar(select(Output.id))
        assert queue_deliveries(s, output_id, ["pacs", "new"], now=T0) == 2
        assert queue_deliveries(s, output_id, ["pacs", "new"], now=T0) == 0
    assert len(claim_one(db, "a", T0)) == 2


def test_study_report_revision_is_compare_and_set(db):
    add_instances(db, 1)
    with db.session() as s:
        study_id = s.scalar(select(Study.id))
    other = ModelIdentity("test-model", "2", "b" * 64, untrained=False)
    report = StudyReport(study_id=study_id, study_instance_uid="1.2.3", revision=1,
                         output=NewOutput(kind=OutputKind.STUDY_SR, sop_instance_uid="1.2.8.1",
                                          series_instance_uid="1.2.8", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33",
                                          file_path="outputs/s1.dcm"),
                         conclusion="pu", reported=["pu"], images=2, models=[MODEL, other])
    with db.session() as s:
        assert record_study_report(s, report, worker="a", destinations=["pacs"], now=T0)
    with db.session() as s:
        assert not record_study_report(s, report, worker="b", destinations=["pacs"], now=T0), "revision 1 is taken"
    with db.session() as s:
        study = s.get(Study, study_id)
        assert (study.report_revision, study.conclusion) == (1, "pu")
        sr = s.scalars(select(Output).where(Output.kind == OutputKind.STUDY_SR)).one()
        assert sr.model_sha256 == "b" * 64 and s.scalar(select(func.count()).select_from(Delivery)) == 1
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STUDY_REPORTED)).one()
        assert [m["weights_sha256"] for m in json.loads(event.detail)["models"]] == ["a" * 64, "b" * 64]


def test_quirks_are_kept_on_the_instance_and_in_its_audit_event(db):
    add_instances(db, 2)
    with db.session() as s:
        plain, odd = claim_instances(s, "a", limit=2, lease_seconds=60, now=T0)
        finish_instance(s, plain, worker="a", findings=[finding()], outputs=[], destinations=[], now=T0)
        finish_instance(s, odd, worker="a", findings=[finding()], outputs=[], destinations=[], now=T0,
                        quirks=["Modality missing: wrote ES"])
    with db.session() as s:
        assert s.get(Instance, plain.id).quirks is None
        assert s.get(Instance, odd.id).quirks == ["Modality missing: wrote ES"]
        details = [json.loads(e.detail) for e in
                   s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.INSTANCE_DONE)
                             .order_by(AuditEvent.id))]
    assert "quirks" not in details[0] and details[1]["quirks"] == ["Modality missing: wrote ES"]


def test_the_migrations_build_exactly_the_tables(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from gastrolens.db.tables import Base

    with db.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert differences == []


def test_finishing_again_replaces_outputs_and_queues_them_again(db):
    """An image processed again (same output UIDs) updates its outputs, sends them again and
    says so in the audit trail; new outputs beside them are inserted; the chain stays intact."""
    add_instances(db, 2)  # the second stands for the same source received again (a new version)
    with db.session() as s:
        (claim, second) = claim_instances(s, "a", limit=2, lease_seconds=60, now=T0)
        assert finish_instance(s, claim, worker="a", findings=[finding(), finding()],
                               outputs=[output("1.2.9.1"), output("1.2.9.2")], destinations=["pacs"], now=T0)
    (first, _) = claim_one(db, "d", T0)
    with db.session() as s:
        record_delivery_attempt(s, first, sent(0), worker="d", policy=POLICY, now=T0)
    with db.session() as s:
        claim = second
        again = NewOutput(kind=OutputKind.SR, sop_instance_uid="1.2.9.1", series_instance_uid="1.2.9",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", file_path="outputs/v2.dcm")
        assert finish_instance(s, claim, worker="a", findings=[finding()], outputs=[again, output("1.2.9.3")],
                               destinations=["pacs"], now=T0)
    with db.session() as s:
        outputs = {o.sop_instance_uid: o for o in s.scalars(select(Output))}
        assert sorted(outputs) == ["1.2.9.1", "1.2.9.2", "1.2.9.3"]
        assert (outputs["1.2.9.1"].file_path, outputs["1.2.9.1"].instance_id) == ("outputs/v2.dcm", second.id)
        states = {(d.output_id, d.state, d.attempts) for d in s.scalars(select(Delivery))}
        assert states == {(o.id, DeliveryState.PENDING, 0) for o in outputs.values()}, "the sent one goes again"
        assert s.scalar(select(func.count()).select_from(Result)) == 3
        notes = [json.loads(e.detail).get("note") for e in s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.OUTPUT_WRITTEN).order_by(AuditEvent.id))]
        assert notes == [None, None, "replaces an earlier output with the same UID", None]
        assert audit.verify_chain(s).intact
    assert audit_types(db)[-3:] == ["output.written", "output.written", "instance.done"]


def test_attempts_recorded_together_each_move_on_and_are_each_audited(db):
    """record_delivery_attempts: one group, every outcome, one claim no longer held."""
    deliveries(db, outputs=4)
    claims = claim_one(db, "a", T0)
    with db.session() as s:  # the fourth was taken over by another worker meanwhile
        s.execute(update(Delivery).where(Delivery.id == claims[3].id).values(claimed_by="b"))
    results = [sent(0), retry("busy", 0xA700), permanent("refused", 0xC000), sent(0)]
    t1 = T0 + timedelta(seconds=1)
    with db.session() as s:
        states = record_delivery_attempts(s, [(c, r, t1) for c, r in zip(claims, results, strict=True)],
                                          worker="a", policy=POLICY)
    assert states == [DeliveryState.SENT, DeliveryState.RETRYING, DeliveryState.DEAD, None]
    with db.session() as s:
        rows = [s.get(Delivery, c.id) for c in claims]
        assert [(r.attempts, r.claimed_by) for r in rows[:3]] == [(1, None)] * 3
        assert rows[0].sent_at is not None and rows[1].last_status == 0xA700 and rows[2].last_error == "refused"
        assert rows[1].next_attempt_at.replace(tzinfo=None) == (t1 + timedelta(seconds=10)).replace(tzinfo=None)
        assert (rows[3].attempts, rows[3].claimed_by, rows[3].state) == (0, "b", DeliveryState.PENDING)
        assert audit.verify_chain(s).intact
    assert audit_types(db)[-3:] == ["delivery.sent", "delivery.retrying", "delivery.dead"]
