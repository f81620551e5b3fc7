"""MPPS SCP with a pynetdicom SCU as the endoscopy workstation: statuses, stored steps, audit, completion signal."""

from __future__ import annotations

import json

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_services_support import Node, make_node, mpps_create, mpps_set, status_of, workstation
from gastrolens.db.states import AuditEventType, CompletionSignalKind, Outcome, ProcedureStepStatus
from gastrolens.db.tables import CompletionSignal, ProcedureStep
from gastrolens.dicom_io.net.services import MODALITY_PERFORMED_PROCEDURE_STEP as MPPS

__all__ = ["make_node"]  # the fixture

VL = "1.2.840.10008.5.1.4.1.1.77.1.1"


def _steps(node: Node) -> list[ProcedureStep]:
    with node.db.read_session() as session:
        return list(session.scalars(select(ProcedureStep)))


def _signals(node: Node) -> list[CompletionSignal]:
    with node.db.read_session() as session:
        return list(session.scalars(select(CompletionSignal).order_by(CompletionSignal.id)))


def _refused(node: Node) -> list[dict[str, str]]:
    return [json.loads(e.detail) for e in node.events(AuditEventType.PROCEDURE_STEP_REFUSED)]


def test_create_then_complete_stores_the_step_and_signals_the_study(make_node) -> None:
    node = make_node()
    study, series, step_uid = generate_uid(), generate_uid(), generate_uid()
    images = [(VL, generate_uid()) for _ in range(3)]
    ae, assoc = workstation(node.port)
    try:
        status, _ = assoc.send_n_create(mpps_create(study), MPPS, step_uid)
        assert status_of(status) == 0x0000
        assert not _signals(node), "IN PROGRESS is no completion signal"
        status, _ = assoc.send_n_set(mpps_set("COMPLETED", {series: images}), MPPS, step_uid)
        assert status_of(status) == 0x0000
    finally:
        assoc.release()
        ae.shutdown()
    (step,) = _steps(node)
    assert (step.sop_instance_uid, step.study_instance_uid, step.status) == (step_uid, study,
                                                                            ProcedureStepStatus.COMPLETED)
    assert step.referenced == [uid for _, uid in images]
    assert step.ended_at is not None and step.station_ae == "ENDO_WS1"
    (signal,) = _signals(node)
    assert (signal.study_instance_uid, signal.kind, signal.procedure_step_id) == (
        study, CompletionSignalKind.MPPS_COMPLETED, step.id)
    assert signal.handled_at is None
    (created,) = node.events(AuditEventType.PROCEDURE_STEP_CREATED)
    (updated,) = node.events(AuditEventType.PROCEDURE_STEP_UPDATED)
    assert created.sop_uid == updated.sop_uid == step_uid
    assert json.loads(updated.detail)["status"] == "COMPLETED"


def test_discontinued_signals_a_discontinued_completion(make_node) -> None:
    node = make_node()
    study, step_uid = generate_uid(), generate_uid()
    ae, assoc = workstation(node.port)
    try:
        assert status_of(assoc.send_n_create(mpps_create(study), MPPS, step_uid)[0]) == 0
        assert status_of(assoc.send_n_set(mpps_set("DISCONTINUED"), MPPS, step_uid)[0]) == 0
    finally:
        assoc.release()
        ae.shutdown()
    (signal,) = _signals(node)
    assert signal.kind is CompletionSignalKind.MPPS_DISCONTINUED
    assert node.events(AuditEventType.PROCEDURE_STEP_UPDATED)[0].outcome is Outcome.WARNING


def test_an_n_set_on_a_completed_step_is_a_processing_failure_and_changes_nothing(make_node) -> None:
    node = make_node()
    study, step_uid = generate_uid(), generate_uid()
    ae, assoc = workstation(node.port)
    try:
        assert status_of(assoc.send_n_create(mpps_create(study), MPPS, step_uid)[0]) == 0
        assert status_of(assoc.send_n_set(mpps_set("COMPLETED"), MPPS, step_uid)[0]) == 0
        status, _ = assoc.send_n_set(mpps_set("DISCONTINUED"), MPPS, step_uid)
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(status) == 0x0110
    assert status.ErrorComment == "Performed Procedure Step Object may no longer be updated"
    assert int(status.ErrorID) == 0xA710
    assert _steps(node)[0].status is ProcedureStepStatus.COMPLETED
    assert len(_signals(node)) == 1
    assert _refused(node)[0]["status"] == "0x0110"


def test_a_duplicate_n_create_is_refused(make_node) -> None:
    node = make_node()
    study, step_uid = generate_uid(), generate_uid()
    ae, assoc = workstation(node.port)
    try:
        assert status_of(assoc.send_n_create(mpps_create(study), MPPS, step_uid)[0]) == 0
        status, _ = assoc.send_n_create(mpps_create(study), MPPS, step_uid)
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(status) == 0x0111
    assert len(_steps(node)) == 1
    assert _refused(node)[0]["status"] == "0x0111"


@pytest.mark.parametrize("left_out", ["PerformedProcedureStepID", "ScheduledStepAttributesSequence", "Modality"])
def test_a_missing_required_attribute_is_refused(make_node, left_out: str) -> None:
    node = make_node()
    ae, assoc = workstation(node.port)
    try:
        status, _ = assoc.send_n_create(mpps_create(generate_uid(), leave_out=[left_out]), MPPS, generate_uid())
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(status) == 0x0120
    assert left_out in str(status.ErrorComment)
    assert not _steps(node)
    (refused,) = _refused(node)
    assert refused["status"] == "0x0120" and left_out in refused["reason"]



@pytest.mark.parametrize("emptied", ["PerformedProcedureStepID", "PerformedProcedureStepStartDate", "Modality"])
def test_a_required_attribute_sent_empty_is_missing_its_value(make_node, emptied: str) -> None:
    """Present but empty is 0x0121 (missing attribute value, PS3.7 C), not 0x0120 (missing attribute)."""
    node = make_node()
    attributes = mpps_create(generate_uid())
    setattr(attributes, emptied, "")
    ae, assoc = workstation(node.port)
    try:
        status, _ = assoc.send_n_create(attributes, MPPS, generate_uid())
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(status) == 0x0121
    assert emptied in str(status.ErrorComment)
    assert not _steps(node)
    (refused,) = _refused(node)
    assert refused["status"] == "0x0121" and emptied in refused["reason"]

def test_n_create_must_start_in_progress_and_n_set_needs_a_known_status(make_node) -> None:
    node = make_node()
    step_uid = generate_uid()
    ae, assoc = workstation(node.port)
    try:
        created, _ = assoc.send_n_create(mpps_create(generate_uid(), status="COMPLETED"), MPPS, generate_uid())
        assert status_of(assoc.send_n_create(mpps_create(generate_uid()), MPPS, step_uid)[0]) == 0
        set_status, _ = assoc.send_n_set(mpps_set("FINISHED"), MPPS, step_uid)
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(created) == 0x0106
    assert status_of(set_status) == 0x0106
    assert _steps(node)[0].status is ProcedureStepStatus.IN_PROGRESS
    assert [r["status"] for r in _refused(node)] == ["0x0106", "0x0106"]


def test_an_n_set_on_an_unknown_step_is_no_such_object(make_node) -> None:
    node = make_node()
    ae, assoc = workstation(node.port)
    try:
        status, _ = assoc.send_n_set(mpps_set("COMPLETED"), MPPS, generate_uid())
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(status) == 0x0112
    assert _refused(node)[0]["status"] == "0x0112"
    assert not _signals(node)


def test_without_an_affected_uid_the_scp_names_the_step(make_node) -> None:
    node = make_node()
    ae, assoc = workstation(node.port)
    try:
        status, _ = assoc.send_n_create(mpps_create(generate_uid()), MPPS, None)
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(status) == 0x0000
    (step,) = _steps(node)
    assert step.sop_instance_uid


def test_a_workstation_off_the_allow_list_is_rejected_like_for_c_store(make_node) -> None:
    node = make_node(allowed_calling_aets=("PACS",))
    with pytest.raises(AssertionError, match="refused"):
        workstation(node.port)
    assert node.events(AuditEventType.ASSOCIATION_REJECTED)
    assert not _steps(node)


def test_an_unforeseen_error_answers_processing_failure_and_is_audited(make_node, monkeypatch) -> None:
    from gastrolens.dicom_io.net.mpps import ProcedureStepSCP

    node = make_node()
    (scp,) = [s for s in node.receiver.services if isinstance(s, ProcedureStepSCP)]

    def broken(request: object) -> object:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(scp.book, "create", broken)
    ae, assoc = workstation(node.port)
    try:
        status, _ = assoc.send_n_create(mpps_create(generate_uid()), MPPS, generate_uid())
        assert assoc.is_established, "the association survives"
    finally:
        assoc.release()
        ae.shutdown()
    assert status_of(status) == 0x0110
    (refused,) = _refused(node)
    assert refused["status"] == "0x0110" and "disk on fire" in refused["reason"]
