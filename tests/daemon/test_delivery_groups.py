"""Delivery records results in groups: one transaction per RECORD_GROUP results, one
attempt and one audit event per object, and results in hand are recorded even when the
sender fails midway (the rest are released, due again at once)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import pytest
from sqlalchemy import func, select

import gastrolens.daemon.delivery as delivery_module
from gastrolens import metrics
from gastrolens.daemon.delivery import RECORD_GROUP, DeliveryStep
from gastrolens.daemon.destinations import Outgoing
from gastrolens.db import audit
from gastrolens.db.states import AuditEventType, DeliveryState
from gastrolens.db.tables import AuditEvent, Delivery, Instance, Output, Series, Study, utcnow
from gastrolens.findings import OutputKind
from gastrolens.sending import SendResult, sent

OBJECTS = 2 * RECORD_GROUP + 4


class FakeSender:
    """Yields SENT for the first ``fail_after`` objects, then raises (a peer that vanished)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.sent: list[str] = []

    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        for item in objects:
            if self.fail_after is not None and len(self.sent) == self.fail_after:
                raise RuntimeError("peer vanished")
            self.sent.append(item.sop_instance_uid)
            yield sent(0)


def seed(stage, count: int) -> None:
    with stage.db.session() as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.10.1177.1")
        s.add(study)
        s.flush()
        series = Series(series_instance_uid="1.2.826.0.1.3680043.10.1177.2", study_id=study.id)
        s.add(series)
        s.flush()
        instance = Instance(sop_instance_uid="1.2.826.0.1.3680043.10.1177.3", series_id=series.id,
                            study_id=study.id, sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                            transfer_syntax_uid="1.2.840.10008.1.2.1", file_path="in.dcm", sha256="0" * 64,
                            size_bytes=1)
        s.add(instance)
        s.flush()
        for n in range(count):
            output = Output(kind=OutputKind.OVERLAY, study_id=study.id, instance_id=instance.id,
                            sop_instance_uid=f"1.2.826.0.1.3680043.10.1177.4.{n}",
                            series_instance_uid="1.2.826.0.1.3680043.10.1177.5",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.7", file_path=f"out/{n}.dcm",
                            model_sha256="b" * 64)
            s.add(output)
            s.flush()
            s.add(Delivery(output_id=output.id, destination="dest", attempts=0, next_attempt_at=utcnow()))


@pytest.fixture
def grouped(make_stage, monkeypatch, tmp_path):
    stage = make_stage(destinations=[{"name": "dest", "folder": str(tmp_path / "dest")}])
    seed(stage, OBJECTS)
    groups: list[int] = []
    record = DeliveryStep._record

    def counting(self, group):
        if group:  # the orphan pass records nothing
            groups.append(len(group))
        return record(self, group)

    monkeypatch.setattr(DeliveryStep, "_record", counting)
    return stage, groups


def test_results_are_recorded_a_group_per_transaction_each_audited(grouped, monkeypatch):
    stage, groups = grouped
    sender = FakeSender()
    monkeypatch.setattr(delivery_module, "sender_for", lambda destination, settings: sender)
    attempts = DeliveryStep(stage.settings, stage.db, stage.store, "w").run_once()
    assert attempts == len(sender.sent) == OBJECTS
    assert groups == [RECORD_GROUP, RECORD_GROUP, OBJECTS - 2 * RECORD_GROUP]
    with stage.db.session() as s:
        rows = list(s.scalars(select(Delivery)))
        events = s.scalar(select(func.count()).select_from(AuditEvent)
                          .where(AuditEvent.event_type == AuditEventType.DELIVERY_SENT))
        assert audit.verify_chain(s).intact
    assert events == OBJECTS
    assert all(r.state is DeliveryState.SENT and r.attempts == 1 and r.claimed_by is None for r in rows)


def test_a_sender_failing_midway_keeps_the_results_in_hand_and_releases_the_rest(grouped, monkeypatch):
    stage, groups = grouped
    fail_after = RECORD_GROUP + 3
    sender = FakeSender(fail_after=fail_after)
    monkeypatch.setattr(delivery_module, "sender_for", lambda destination, settings: sender)
    with pytest.raises(RuntimeError, match="peer vanished"):
        DeliveryStep(stage.settings, stage.db, stage.store, "w").run_once()
    assert groups == [RECORD_GROUP, 3]
    with stage.db.session() as s:
        rows = {r.output_id: r for r in s.scalars(select(Delivery))}
        sent_uids = set(s.scalars(select(Output.sop_instance_uid).join(Delivery, Delivery.output_id == Output.id)
                                  .where(Delivery.state == DeliveryState.SENT)))
    assert sent_uids == set(sender.sent) and len(sent_uids) == fail_after
    unsent = [r for r in rows.values() if r.state is not DeliveryState.SENT]
    assert len(unsent) == OBJECTS - fail_after
    assert all(r.state is DeliveryState.PENDING and r.claimed_by is None and r.attempts == 0 for r in unsent)


class BusySender(FakeSender):
    """Spends ``cpu`` seconds of its thread's CPU per object."""

    def __init__(self, cpu: float) -> None:
        super().__init__()
        self.cpu = cpu

    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        for result in super().send(objects):
            started = time.thread_time()
            while time.thread_time() - started < self.cpu:
                pass
            yield result


@pytest.mark.parametrize("lanes", [1, 2])
def test_delivery_cpu_is_counted_once_per_thread(make_stage, monkeypatch, tmp_path, lanes):
    """Stage ``deliver`` counts the calling thread and each lane thread, each once."""
    stage = make_stage(destinations=[{"name": "dest", "ae_title": "PEER", "host": "127.0.0.1", "port": 104,
                                      "associations": lanes}])
    seed(stage, 8)
    monkeypatch.setattr(delivery_module, "MIN_PER_ASSOCIATION", 1)
    monkeypatch.setattr(delivery_module, "sender_for", lambda destination, settings: BusySender(0.02))

    def deliver_seconds() -> float:
        return metrics.REGISTRY.get_sample_value("gastrolens_stage_cpu_seconds_total", {"stage": "deliver"}) or 0.0

    before = deliver_seconds()
    assert DeliveryStep(stage.settings, stage.db, stage.store, "w").run_once() == 8
    counted = deliver_seconds() - before
    assert 8 * 0.02 <= counted < 8 * 0.02 * 1.4, f"{counted:.3f} s counted for 0.16 s of sending"


def test_an_idle_tick_opens_no_write_transaction(make_stage, monkeypatch, tmp_path):
    """Nothing due: delivery only reads (a write transaction would take SQLite's write lock
    from the receivers at every tick); something due: it claims and sends it."""
    stage = make_stage(destinations=[{"name": "dest", "folder": str(tmp_path / "dest")}])
    writes = []
    session = stage.db.session
    monkeypatch.setattr(stage.db, "session", lambda: writes.append(1) or session())
    step = DeliveryStep(stage.settings, stage.db, stage.store, "w")
    assert step.run_once() == 0 and writes == []
    monkeypatch.setattr(stage.db, "session", session)
    seed(stage, 2)
    monkeypatch.setattr(stage.db, "session", lambda: writes.append(1) or session())
    sender = FakeSender()
    monkeypatch.setattr(delivery_module, "sender_for", lambda destination, settings: sender)
    assert step.run_once() == 2 and len(sender.sent) == 2 and writes


class SlowSender(FakeSender):
    """A peer that takes ``seconds`` per object."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        for result in super().send(objects):
            time.sleep(self.seconds)
            yield result


def test_a_slow_peer_never_outlives_the_lease_it_sends_under(make_stage, monkeypatch, tmp_path):
    """An association still sending after half the lease releases the rest and claims
    again: no object stays claimed past its lease (another worker would send it too)."""
    stage = make_stage(destinations=[{"name": "dest", "folder": str(tmp_path / "dest")}],
                       scheduler={"study_quiet_seconds": 0, "lease_seconds": 1, "output_processes": 0})
    seed(stage, 12)
    sender = SlowSender(0.1)
    claims: list[int] = []
    claim = DeliveryStep._claim

    def counting(self, now, **kwargs):
        found = claim(self, now, **kwargs)
        if kwargs.get("destination"):
            claims.append(len(found))
        return found

    monkeypatch.setattr(DeliveryStep, "_claim", counting)
    monkeypatch.setattr(delivery_module, "BATCH", 12)
    monkeypatch.setattr(delivery_module, "sender_for", lambda destination, settings: sender)
    step = DeliveryStep(stage.settings, stage.db, stage.store, "w")
    assert step.run_once() < 12, "the first claim was sent whole, past half its lease"
    attempts = sum(step.run_once() for _ in range(10))
    with stage.db.session() as s:
        rows = list(s.scalars(select(Delivery)))
    assert all(r.state is DeliveryState.SENT and r.attempts == 1 and r.claimed_by is None for r in rows)
    assert sorted(sender.sent) == sorted(set(sender.sent)) and len(sender.sent) == 12 and attempts > 0
    assert claims[0] == 12 and len(claims) >= 3
