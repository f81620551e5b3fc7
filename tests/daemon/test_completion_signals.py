"""The one completion owner takes MPPS and the `studies complete` command besides the quiet timer."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from gastrolens.daemon.completion import StudyCompletion
from gastrolens.daemon.pipeline import InferenceStep
from gastrolens.db.states import AuditEventType, ProcedureStepStatus
from gastrolens.db.tables import AuditEvent, CompletionSignal, Output, utcnow
from gastrolens.db.transitions_services import NewStep, create_procedure_step, update_procedure_step
from gastrolens.findings import OutputKind

QUIET_FOR_EVER = {"study_quiet_seconds": 3600, "lease_seconds": 60, "output_processes": 0}


def _mpps(stage, study_uid: str, status: ProcedureStepStatus, referenced: list[str]) -> None:
    step_uid = generate_uid()
    with stage.db.session() as session:
        create_procedure_step(session, NewStep(
            sop_instance_uid=step_uid, study_instance_uid=study_uid, step_id="PPS1", station_ae="ENDO_WS1",
            calling_ae="ENDO_WS1", peer_address="127.0.0.1", referenced=[], attributes={}), actor="test", now=utcnow())
    with stage.db.session() as session:
        update_procedure_step(session, step_uid, status=status, referenced=referenced, attributes={}, actor="test",
                              now=utcnow())


def _study_srs(stage) -> list:
    with stage.db.session() as session:
        outputs = session.scalars(select(Output).where(Output.kind == OutputKind.STUDY_SR).order_by(Output.revision))
        return [dcmread(stage.store.absolute(o.file_path)) for o in outputs]


def _pending_signals(stage) -> int:
    with stage.db.session() as session:
        return len(session.scalars(select(CompletionSignal).where(CompletionSignal.handled_at.is_(None))).all())


def _comments(sr) -> list[str]:
    """The root's Comment (121106, DCM) items: the notes on an incomplete report."""
    return [str(item.TextValue) for item in sr.ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]


def test_mpps_completed_reports_at_once_when_every_listed_image_is_done(make_stage, tiny_engine, study_uid):
    stage = make_stage(scheduler=QUIET_FOR_EVER)
    uids = [stage.receive(study_uid, seed=i) for i in range(2)]
    completion = StudyCompletion(stage.settings, stage.db, stage.store, "w")
    _mpps(stage, study_uid, ProcedureStepStatus.COMPLETED, uids)
    assert completion.run_signals() == 0, "not while the images wait for inference"
    assert _pending_signals(stage) == 1
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    assert completion.run_once() == 0, "the quiet timer would still wait an hour"
    assert completion.run_signals() == 1
    assert _pending_signals(stage) == 0
    (sr,) = _study_srs(stage)
    assert sr.CompletionFlag == "COMPLETE" and not _comments(sr)
    assert completion.run_signals() == 0 and completion.run_once() == 0, "reported once"


def test_an_image_listed_but_never_received_waits_for_the_grace_time_then_is_named(make_stage, tiny_engine,
                                                                                     study_uid):
    waiting = make_stage(scheduler={**QUIET_FOR_EVER, "mpps_grace_seconds": 3600})
    uid = waiting.receive(study_uid)
    InferenceStep(waiting.settings, waiting.db, waiting.store, tiny_engine, "w").run_once()
    never = generate_uid()
    _mpps(waiting, study_uid, ProcedureStepStatus.COMPLETED, [uid, never])
    assert StudyCompletion(waiting.settings, waiting.db, waiting.store, "w").run_signals() == 0
    assert _pending_signals(waiting) == 1

    over = make_stage(scheduler={**QUIET_FOR_EVER, "mpps_grace_seconds": 0})  # same database, grace over
    assert StudyCompletion(over.settings, over.db, over.store, "w").run_signals() == 1
    (sr,) = _study_srs(over)
    assert sr.CompletionFlag == "PARTIAL"
    (comment,) = _comments(sr)
    assert never in comment and "1 image(s) listed by the procedure step were not received" in comment
    with over.db.session() as session:
        signal = session.scalars(select(CompletionSignal)).one()
    assert signal.handled_at is not None and "1 missing" in (signal.outcome or "")
    with over.db.session() as session:
        (settled,) = session.scalars(select(AuditEvent).where(
            AuditEvent.event_type == AuditEventType.STUDY_COMPLETION_SETTLED)).all()
    assert settled.study_uid == study_uid
    assert json.loads(settled.detail)["kind"] == "mpps-completed"


def test_discontinued_reports_what_arrived_and_says_so(make_stage, tiny_engine, study_uid):
    stage = make_stage(scheduler=QUIET_FOR_EVER)
    uid = stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    _mpps(stage, study_uid, ProcedureStepStatus.DISCONTINUED, [uid])
    assert StudyCompletion(stage.settings, stage.db, stage.store, "w").run_signals() == 1
    (sr,) = _study_srs(stage)
    assert sr.CompletionFlag == "PARTIAL"
    assert _comments(sr) == ["Procedure step DISCONTINUED: this report covers the 1 image(s) that arrived"]


def test_a_signal_for_a_study_never_received_is_settled_without_a_report(make_stage):
    stage = make_stage(scheduler={**QUIET_FOR_EVER, "mpps_grace_seconds": 0})
    _mpps(stage, generate_uid(), ProcedureStepStatus.COMPLETED, [generate_uid()])
    assert StudyCompletion(stage.settings, stage.db, stage.store, "w").run_signals() == 0
    assert _pending_signals(stage) == 0
    assert not _study_srs(stage)


def test_the_studies_complete_command_is_audited_and_reported_by_the_completion_job(
        make_stage, tiny_engine, study_uid, tmp_path: Path, capsys):
    from gastrolens.cli import main

    stage = make_stage(scheduler=QUIET_FOR_EVER)
    stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    config = tmp_path / "cli.toml"
    config.write_text(f'[database]\nurl = "{stage.settings.database.url}"\n[storage]\nroot = "{tmp_path / "cli"}"\n')
    assert main(["studies", "complete", "--config", str(config), generate_uid()]) == 1, "an unknown study"
    assert main(["studies", "complete", "--config", str(config), study_uid]) == 0
    assert "completion requested" in capsys.readouterr().out
    with stage.db.session() as session:
        (requested,) = session.scalars(select(AuditEvent).where(
            AuditEvent.event_type == AuditEventType.STUDY_COMPLETION_REQUESTED)).all()
    assert requested.study_uid == study_uid and requested.actor.startswith("cli:")
    assert json.loads(requested.detail) == {"kind": "command"}
    assert StudyCompletion(stage.settings, stage.db, stage.store, "w").run_signals() == 1
    (sr,) = _study_srs(stage)
    assert sr.CompletionFlag == "COMPLETE"


def test_a_completed_step_after_the_quiet_timer_reported_everything_writes_no_second_sr(make_stage, tiny_engine,
                                                                                         study_uid):
    stage = make_stage()  # study_quiet_seconds = 0: the quiet timer reports first
    uid = stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    completion = StudyCompletion(stage.settings, stage.db, stage.store, "w")
    assert completion.run_once() == 1
    _mpps(stage, study_uid, ProcedureStepStatus.COMPLETED, [uid])
    assert completion.run_signals() == 0
    assert _pending_signals(stage) == 0, "settled, not left pending"
    assert len(_study_srs(stage)) == 1
