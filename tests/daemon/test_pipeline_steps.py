"""The pipeline's stages one tick at a time: inference, leases, study SR revisions, delivery, retention."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from pydicom import dcmread
from sqlalchemy import func, select, text, update

from gastrolens.daemon.completion import StudyCompletion
from gastrolens.daemon.delivery import DeliveryStep, requeue
from gastrolens.daemon.pipeline import InferenceStep
from gastrolens.daemon.retention import RetentionStep
from gastrolens.db.queue import claim_instances
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState
from gastrolens.db.tables import AuditEvent, Delivery, Instance, Output, Result, Study, utcnow
from gastrolens.db.transitions import fail_instance
from gastrolens.findings import OutputKind
from support import free_port


def count(stage, table, *where) -> int:
    with stage.db.session() as s:
        return s.scalar(select(func.count()).select_from(table).where(*where))


def audit_types(stage) -> list[str]:
    with stage.db.session() as s:
        return [e.value for e in s.scalars(select(AuditEvent.event_type).order_by(AuditEvent.id))]


def test_batch_records_results_outputs_and_deliveries(stage, tiny_engine, study_uid):
    uids = [stage.receive(study_uid, seed=i) for i in range(3)]
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "worker-a")
    report = step.run_once()
    assert (report.claimed, report.done, report.failed) == (3, 3, 0)
    assert step.run_once() is None
    with stage.db.session() as s:
        instances = s.scalars(select(Instance)).all()
        assert {i.state for i in instances} == {InstanceState.DONE}
        results = s.scalars(select(Result)).all()
        assert len(results) == 3
        assert all(abs(sum((r.p_normal, r.p_pu, r.p_egc_hgin, r.p_agc, r.p_smt)) - 1) < 1e-4 for r in results)
        assert all(r.untrained and r.model_name == tiny_engine.identity.name for r in results)
        outputs = s.scalars(select(Output)).all()
        kinds = [o.kind for o in outputs]
        assert kinds.count(OutputKind.SR) == 3 and kinds.count(OutputKind.OVERLAY) == 3
        assert kinds.count(OutputKind.SEG) == sum(r.lesion_present and r.lesion_area_fraction > 0 for r in results)
        assert all(stage.store.absolute(o.file_path).exists() for o in outputs)
    assert count(stage, Delivery) == len(outputs)
    sources = {str(dcmread(stage.store.absolute(o.file_path)).SourceImageSequence[0].ReferencedSOPInstanceUID)
               for o in outputs if o.kind is OutputKind.OVERLAY}
    assert sources == set(uids)
    types = audit_types(stage)
    assert types.count("instance.claimed") == 3 and types.count("instance.done") == 3
    assert types.count("output.written") == len(outputs)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")  # the truncation is the point
def test_a_bad_image_fails_alone(stage, tiny_engine, study_uid):
    good = stage.receive(study_uid, seed=1)
    good_path = stage.store.absolute(_path_of(stage, good))
    good_bytes = good_path.read_bytes()
    bad_uid = stage.receive(study_uid, seed=2)
    path = stage.store.absolute(_path_of(stage, bad_uid))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])  # truncate the JPEG stream
    report = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    assert (report.done, report.failed) == (1, 1)
    with stage.db.session() as s:
        failed = s.scalars(select(Instance).where(Instance.state == InstanceState.FAILED)).one()
        assert failed.sop_instance_uid == bad_uid and "decode" in failed.error
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.INSTANCE_FAILED)).one()
        assert json.loads(event.detail)["reason"] == failed.error
        assert s.scalar(select(Instance.state).where(Instance.sop_instance_uid == good)) is InstanceState.DONE
    assert good_path.read_bytes() == good_bytes, "the good file was untouched"


def _path_of(stage, sop_uid: str) -> str:
    with stage.db.session() as s:
        return s.scalar(select(Instance.file_path).where(Instance.sop_instance_uid == sop_uid))


def test_expired_lease_is_claimed_again_and_the_late_worker_loses(stage, tiny_engine, study_uid):
    stage.receive(study_uid)
    claimed_at = utcnow() - timedelta(seconds=120)  # a worker that claimed two minutes ago and died
    with stage.db.session() as s:
        (lost,) = claim_instances(s, "dead-worker", limit=10, lease_seconds=60, now=claimed_at)
    with stage.db.session() as s:
        assert claim_instances(s, "other", limit=10, lease_seconds=60, now=claimed_at + timedelta(seconds=59)) == []
    report = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "survivor").run_once()
    assert report.done == 1
    assert "instance.reclaimed" in audit_types(stage)
    with stage.db.session() as s:  # the dead worker comes back with its result: it lost the claim
        assert not fail_instance(s, lost, worker="dead-worker", reason="late", now=utcnow())
    assert count(stage, Result) == 1
    assert count(stage, Instance, Instance.state == InstanceState.DONE) == 1


def test_study_sr_revisions_name_their_predecessor(stage, tiny_engine, study_uid):
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w")
    completion = StudyCompletion(stage.settings, stage.db, stage.store, "w")
    stage.receive(study_uid, seed=1)
    step.run_once()
    assert completion.run_once() == 1
    assert completion.run_once() == 0, "nothing new: no second report"
    stage.receive(study_uid, seed=2)  # a late image
    assert completion.run_once() == 0, "not while an instance waits"
    step.run_once()
    assert completion.run_once() == 1
    with stage.db.session() as s:
        reports = s.scalars(select(Output).where(Output.kind == OutputKind.STUDY_SR).order_by(Output.revision)).all()
        study = s.scalars(select(Study)).one()
    assert [r.revision for r in reports] == [1, 2] and study.report_revision == 2
    second = dcmread(stage.store.absolute(reports[1].file_path))
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == reports[0].sop_instance_uid
    assert reports[0].sop_instance_uid != reports[1].sop_instance_uid
    assert study.conclusion in {"normal", "pu", "egc_hgin", "agc", "smt"}


def test_a_revision_reads_only_the_sources_it_has_not_read_before(stage, tiny_engine, study_uid, monkeypatch):
    """Study SR revision n+1 takes the headers revision n read from the cache: only the late image is read."""
    import gastrolens.daemon.completion as completion_module

    read = []
    real = completion_module.dcmread
    monkeypatch.setattr(completion_module, "dcmread", lambda path, **kw: read.append(path.name) or real(path, **kw))
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w")
    completion = StudyCompletion(stage.settings, stage.db, stage.store, "w")
    stage.receive(study_uid, seed=1)
    stage.receive(study_uid, seed=2)
    step.run_once()
    assert completion.run_once() == 1 and len(read) == 2
    stage.receive(study_uid, seed=3)  # a late image
    step.run_once()
    assert completion.run_once() == 1
    assert len(read) == 3 and len(set(read)) == 3, "revision 2 read the late image only"


def test_quiet_period_delays_the_study_sr(make_stage, tiny_engine, study_uid):
    stage = make_stage(scheduler={"study_quiet_seconds": 3600})
    stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    assert StudyCompletion(stage.settings, stage.db, stage.store, "w").run_once() == 0


def test_folder_delivery(stage, tiny_engine, study_uid, tmp_path):
    stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    attempts = DeliveryStep(stage.settings, stage.db, stage.store, "w").run_once()
    assert attempts == count(stage, Output) > 0
    assert count(stage, Delivery, Delivery.state == DeliveryState.SENT) == attempts
    assert len(list((tmp_path / "archive" / study_uid).glob("*.dcm"))) == attempts


def test_unreachable_peer_backs_off_then_dies_and_can_be_requeued(make_stage, tiny_engine, study_uid):
    stage = make_stage(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
                       delivery={"backoff_seconds": 0, "max_attempts": 2})
    stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    step = DeliveryStep(stage.settings, stage.db, stage.store, "w")
    step.run_once()
    assert count(stage, Delivery, Delivery.state == DeliveryState.RETRYING) == count(stage, Delivery)
    step.run_once()
    total = count(stage, Delivery)
    assert count(stage, Delivery, Delivery.state == DeliveryState.DEAD) == total
    types = audit_types(stage)
    assert types.count("delivery.retrying") == total and types.count("delivery.dead") == total
    assert requeue(stage.db, "cli:test", all_dead=True) == total
    assert count(stage, Delivery, Delivery.state == DeliveryState.PENDING) == total


def test_backoff_waits_before_the_next_attempt(make_stage, tiny_engine, study_uid):
    stage = make_stage(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
                       delivery={"backoff_seconds": 3600, "max_attempts": 5})
    stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    step = DeliveryStep(stage.settings, stage.db, stage.store, "w")
    first = step.run_once()
    assert first > 0 and step.run_once() == 0, "not due again for an hour"


def test_retention_keeps_what_was_not_delivered(make_stage, tiny_engine, study_uid):
    stage = make_stage(retention={"enabled": True, "days": 1},
                       destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    old = utcnow() - timedelta(days=2)
    with stage.db.session() as s:
        s.execute(update(Instance).values(received_at=old))
        s.execute(update(Output).values(created_at=old))
    retention = RetentionStep(stage.settings, stage.db, stage.store, "w")
    assert retention.run_once() == 0, "undelivered outputs and their source stay"
    with stage.db.session() as s:
        s.execute(update(Delivery).values(state=DeliveryState.SENT))
    removed = retention.run_once()
    assert removed == count(stage, Output) + 1
    with stage.db.session() as s:
        assert all(not stage.store.absolute(o.file_path).exists() for o in s.scalars(select(Output)))
        assert all(i.removed_at is not None for i in s.scalars(select(Instance)))
    assert audit_types(stage).count("retention.removed") == removed


def _refuse_results_of(stage, sop_uid: str, message: str) -> None:
    """A real database error for one instance: a trigger that refuses its results rows."""
    with stage.db.session() as s:
        instance_id = s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid))
    with stage.db.engine.begin() as conn:
        if stage.db.engine.dialect.name == "sqlite":
            conn.execute(text(f"CREATE TRIGGER refuse_one BEFORE INSERT ON results "
                              f"WHEN NEW.instance_id = {instance_id} BEGIN SELECT RAISE(ABORT, '{message}'); END"))
        else:
            conn.execute(text(f"CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                              f"IF NEW.instance_id = {instance_id} THEN RAISE EXCEPTION '{message}'; END IF; "
                              f"RETURN NEW; END $$"))
            conn.execute(text("CREATE TRIGGER refuse_one BEFORE INSERT ON results FOR EACH ROW "
                              "EXECUTE FUNCTION refuse_one()"))


def test_a_database_error_fails_one_instance_not_the_batch(stage, tiny_engine, study_uid):
    uids = [stage.receive(study_uid, seed=i) for i in range(3)]
    _refuse_results_of(stage, uids[1], "value too long")
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w")
    report = step.run_once()
    assert (report.done, report.failed) == (2, 1)
    with stage.db.session() as s:
        failed = s.scalars(select(Instance).where(Instance.state == InstanceState.FAILED)).one()
    assert failed.sop_instance_uid == uids[1] and "value too long" in failed.error


def test_drain_processes_every_batch_with_outputs_built_in_worker_processes(make_stage, tiny_engine, study_uid):
    stage = make_stage(model={"batch_size": 2},
                       scheduler={"study_quiet_seconds": 0, "lease_seconds": 60, "output_processes": 1})
    for i in range(5):
        stage.receive(study_uid, seed=i)
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w")
    try:
        assert step.drain(lambda: False) == 5
    finally:
        step.close()
    assert count(stage, Instance, Instance.state == InstanceState.DONE) == 5
    assert count(stage, Result) == 5
    assert count(stage, Output, Output.kind == OutputKind.OVERLAY) == 5


def test_a_dead_output_worker_costs_no_image(make_stage, tiny_engine, study_uid):
    import multiprocessing
    import multiprocessing.connection
    import os
    import signal

    stage = make_stage(scheduler={"study_quiet_seconds": 0, "lease_seconds": 60, "output_processes": 1,
                                  "decode_processes": 0})  # the only child process is the output worker
    before = set(multiprocessing.active_children())
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w")  # starts its worker
    try:
        stage.receive(study_uid, seed=1)
        assert step.run_once().done == 1
        workers = [p for p in multiprocessing.active_children() if p not in before]
        assert len(workers) == 1
        os.kill(workers[0].pid, signal.SIGKILL)
        assert multiprocessing.connection.wait([workers[0].sentinel], timeout=30), "the worker died"
        stage.receive(study_uid, seed=2)
        report = step.run_once()
        assert (report.done, report.failed) == (1, 0), "the image of the dead worker is built anyway"
        stage.receive(study_uid, seed=3)
        assert step.run_once().done == 1, "fresh workers serve the next batch"
    finally:
        step.close()


def test_drain_stops_when_asked(make_stage, tiny_engine, study_uid):
    stage = make_stage(model={"batch_size": 2})
    for i in range(5):
        stage.receive(study_uid, seed=i)
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w")
    calls = []
    assert step.drain(lambda: calls.append(1) or len(calls) > 1) == 2
    step.close()
    assert count(stage, Instance, Instance.state == InstanceState.DONE) == 2
    assert count(stage, Instance, Instance.state == InstanceState.RECEIVED) == 3


def test_a_quirky_source_gets_its_outputs_and_the_quirk_is_recorded(stage, tiny_engine, study_uid):
    from io import BytesIO

    from gastrolens.samples import as_dicom, endoscopy_frame

    frame, _ = endoscopy_frame(60, 80, None, seed=3)
    ds = as_dicom(frame, study_uid=study_uid, jpeg_quality=90)
    del ds.Modality
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    uid = stage.receive(study_uid, data=buffer.getvalue())
    report = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    assert (report.done, report.failed) == (1, 0)
    with stage.db.session() as s:
        instance = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.INSTANCE_DONE)).one()
    assert instance.quirks and any("Modality" in q for q in instance.quirks)
    assert json.loads(event.detail)["quirks"] == instance.quirks


@pytest.fixture(scope="module")
def second_engine():
    """Another model: same architectures, other weights (seed 1), so another weights sha256."""
    from gastrolens.models import Engine, untrained_package

    engine = Engine(untrained_package(classifier_input_size=64, segmenter_input_size=65, seed=1), device="cpu",
                    batch_size=4)
    yield engine
    engine.close()


def test_a_study_judged_by_two_models_gets_one_sr_naming_both(stage, tiny_engine, second_engine, study_uid):
    first, second = tiny_engine.identity.weights_sha256, second_engine.identity.weights_sha256
    assert first != second
    stage.receive(study_uid, seed=1)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    stage.receive(study_uid, seed=2)  # the model was updated between the two images
    InferenceStep(stage.settings, stage.db, stage.store, second_engine, "w").run_once()
    assert StudyCompletion(stage.settings, stage.db, stage.store, "w").run_once() == 1
    with stage.db.session() as s:
        report = s.scalars(select(Output).where(Output.kind == OutputKind.STUDY_SR)).one()
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STUDY_REPORTED)).one()
    assert report.model_sha256 == second, "the model of the newest finding"
    assert [m["weights_sha256"] for m in json.loads(event.detail)["models"]] == [first, second]
    sr = stage.store.absolute(report.file_path).read_bytes()
    assert f"weights_sha256={first}".encode() in sr and f"weights_sha256={second}".encode() in sr
    assert dciodvfy_errors(stage.store.absolute(report.file_path)) == []


def test_an_instance_processed_again_counts_once_by_its_newest_result(stage, tiny_engine, second_engine, study_uid):
    uid = stage.receive(study_uid, seed=1)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    with stage.db.session() as s:  # processed again, as an operator's reprocessing would
        s.execute(update(Instance).where(Instance.sop_instance_uid == uid).values(state=InstanceState.RECEIVED))
    InferenceStep(stage.settings, stage.db, stage.store, second_engine, "w").run_once()
    assert count(stage, Result) == 2, "one result per model for the one frame"
    assert StudyCompletion(stage.settings, stage.db, stage.store, "w").run_once() == 1
    with stage.db.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STUDY_REPORTED)).one()
    detail = json.loads(event.detail)
    assert detail["images"] == 1
    assert [m["weights_sha256"] for m in detail["models"]] == [second_engine.identity.weights_sha256]


def test_a_late_image_after_retention_gets_a_revision_covering_the_whole_study(make_stage, tiny_engine, study_uid):
    stage = make_stage(retention={"enabled": True, "days": 1})
    step = InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w")
    completion = StudyCompletion(stage.settings, stage.db, stage.store, "w")
    stage.receive(study_uid, seed=1)
    step.run_once()
    assert completion.run_once() == 1
    old = utcnow() - timedelta(days=2)
    with stage.db.session() as s:
        s.execute(update(Instance).values(received_at=old))
        s.execute(update(Output).values(created_at=old))
        s.execute(update(Delivery).values(state=DeliveryState.SENT))
    assert RetentionStep(stage.settings, stage.db, stage.store, "w").run_once() > 0
    with stage.db.session() as s:
        assert all(i.removed_at is not None for i in s.scalars(select(Instance)))
    stage.receive(study_uid, seed=2)  # a late image, a month on
    step.run_once()
    assert completion.run_once() == 1
    with stage.db.session() as s:
        latest = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STUDY_REPORTED)
                           .order_by(AuditEvent.id.desc())).first()
    assert json.loads(latest.detail)["revision"] == 2 and json.loads(latest.detail)["images"] == 2
    with stage.db.session() as s:
        revision_2 = s.scalars(select(Output).where(Output.kind == OutputKind.STUDY_SR, Output.revision == 2)).one()
    assert dciodvfy_errors(stage.store.absolute(revision_2.file_path)) == []


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's 'Error' lines (its exit status is unreliable)."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
