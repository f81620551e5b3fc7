"""HL7 v2 results end to end in process: images in, study SR written, ORU^R01 delivered over MLLP.

The listener is hl7apy's MLLPServer (tests/hl7v2/listener.py), a library GastroLens does
not send with (the sender is python-hl7's MLLP client).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from io import BytesIO

import pytest
from sqlalchemy import select

from dicom_io.documents.synthetic import endoscopy_frame as frame
from dicom_io.documents.synthetic import lesion_mask, make_finding, make_source
from gastrolens.config.schema import HL7
from gastrolens.daemon.completion import StudyCompletion
from gastrolens.daemon.delivery import DeliveryStep
from gastrolens.daemon.destinations import HL7Sender, Outgoing
from gastrolens.daemon.pipeline import InferenceStep
from gastrolens.db.states import AuditEventType, DeliveryState
from gastrolens.db.tables import AuditEvent, Delivery, Output
from gastrolens.dicom_io.documents.outputs import write_study_sr
from gastrolens.findings import LesionClass, OutputKind
from gastrolens.samples import as_dicom, endoscopy_frame
from gastrolens.sending import SendOutcome
from hl7v2.listener import Listener

CHINESE = "张黎明"
NAME = f"Zhang^Liming={CHINESE}"


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    started: list[Listener] = []
    yield started
    for listener in started:
        listener.stop()


def hl7_destination(port: int, **extra: object) -> dict:
    return {"kind": "hl7", "name": "ris", "host": "127.0.0.1", "port": port, "receiving_application": "RIS",
            "receiving_facility": "HOSP", "ack_timeout_seconds": 2, **extra}


def image(study_uid: str, seed: int, lesion: LesionClass | None, charset: str) -> bytes:
    frame, _ = endoscopy_frame(60, 80, lesion, seed=seed)
    ds = as_dicom(frame, study_uid=study_uid, patient_name=NAME, patient_id="GL-HL7-1", accession_number="ACC42")
    ds.SpecificCharacterSet = charset
    ds.IssuerOfPatientID = "HOSP-A"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def run(stage, engine, *, deliver: int = 1) -> None:
    InferenceStep(stage.settings, stage.db, stage.store, engine, "w").run_once()
    StudyCompletion(stage.settings, stage.db, stage.store, "w").run_once()
    step = DeliveryStep(stage.settings, stage.db, stage.store, "w")
    for _ in range(deliver):
        step.run_once()


def deliveries(stage) -> list[tuple[str, OutputKind, DeliveryState, int]]:
    with stage.db.session() as s:
        return [(d.destination, o.kind, d.state, o.revision) for d, o in s.execute(
            select(Delivery, Output).join(Output, Delivery.output_id == Output.id).order_by(Delivery.id))]


@pytest.mark.parametrize(("source_charset", "charset", "codec"), [
    ("GB18030", "GB 18030-2000", "gb18030"),
    ("ISO_IR 192", "UNICODE UTF-8", "utf-8"),
])
def test_the_listener_receives_parses_and_acks_final_then_corrected(make_stage, tiny_engine, study_uid, tmp_path,
                                                                     listeners, source_charset, charset, codec):
    listener = Listener(codec=codec)
    listeners.append(listener)
    stage = make_stage(destinations=[hl7_destination(listener.port, charset=charset),
                                     {"name": "archive", "folder": str(tmp_path / "archive")}])
    stage.receive(study_uid, data=image(study_uid, 0, LesionClass.PU, source_charset))
    stage.receive(study_uid, data=image(study_uid, 1, None, source_charset))
    run(stage, tiny_engine)

    rows = deliveries(stage)
    to_ris = [r for r in rows if r[0] == "ris"]
    assert [(kind, state) for _, kind, state, _ in to_ris] == [(OutputKind.STUDY_SR, DeliveryState.SENT)], \
        "an HL7 destination gets the study SR only"
    assert {kind for name, kind, _, _ in rows if name == "archive"} >= {OutputKind.SR, OutputKind.STUDY_SR}
    (first,) = listener.received
    assert first.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and first.msh.msh_12.to_er7() == "2.5.1"
    assert first.msh.msh_18.to_er7() == charset
    pid = first.pid
    assert pid.pid_3.to_er7() == "GL-HL7-1^^^HOSP-A^MR"
    assert [rep.to_er7() for rep in pid.pid_5] == ["Zhang^Liming^^^^^L^A", f"{CHINESE}^^^^^^L^I"]
    obr = first.obr
    assert obr.obr_2.to_er7() == obr.obr_3.to_er7() == "ACC42"
    assert obr.obr_25.to_er7() == "F"
    observations = [obx.obx_3.to_er7().split("^")[0] for obx in first.obx]
    assert observations[0] == "121077" and "111001" in observations and "121106" in observations, observations

    stage.receive(study_uid, data=image(study_uid, 2, LesionClass.AGC, source_charset))  # a late image: revision 2
    run(stage, tiny_engine)
    assert len(listener.received) == 2
    assert listener.received[1].obr.obr_25.to_er7() == "C"
    assert {obx.obx_11.to_er7() for obx in listener.received[1].obx} == {"C"}
    assert [(kind, state, revision) for name, kind, state, revision in deliveries(stage) if name == "ris"] == [
        (OutputKind.STUDY_SR, DeliveryState.SENT, 1), (OutputKind.STUDY_SR, DeliveryState.SENT, 2)]


def test_an_ae_is_retried_then_dead(make_stage, tiny_engine, study_uid, listeners):
    listener = Listener(answer="AE")
    listeners.append(listener)
    stage = make_stage(destinations=[hl7_destination(listener.port)], delivery={"backoff_seconds": 0,
                                                                               "max_attempts": 3})
    stage.receive(study_uid, data=image(study_uid, 0, LesionClass.PU, "ISO_IR 192"))
    run(stage, tiny_engine, deliver=3)
    assert [(kind, state) for _, kind, state, _ in deliveries(stage)] == [(OutputKind.STUDY_SR, DeliveryState.DEAD)]
    assert len(listener.received) == 3
    assert len({m.msh.msh_10.to_er7() for m in listener.received}) == 1, "a retry repeats the control ID"
    with stage.db.session() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.event_type.in_(
            (AuditEventType.DELIVERY_RETRYING, AuditEventType.DELIVERY_DEAD))).order_by(AuditEvent.id)))
        last_error = s.scalar(select(Delivery.last_error))
    assert [e.event_type for e in events] == [AuditEventType.DELIVERY_RETRYING] * 2 + [AuditEventType.DELIVERY_DEAD]
    assert "AE" in last_error and "order not found" in last_error


def test_no_ack_within_the_timeout_is_retried(make_stage, tiny_engine, study_uid):
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        stage = make_stage(destinations=[hl7_destination(port, ack_timeout_seconds=0.5)],
                           delivery={"backoff_seconds": 0, "max_attempts": 5})
        stage.receive(study_uid, data=image(study_uid, 0, None, "ISO_IR 192"))
        run(stage, tiny_engine)
    with stage.db.session() as s:
        delivery = s.scalars(select(Delivery)).one()
    assert delivery.state is DeliveryState.RETRYING and delivery.attempts == 1
    assert "no ACK within 0.5 s" in delivery.last_error


def test_a_charset_that_cannot_hold_the_name_is_dead_at_once(make_stage, tiny_engine, study_uid, listeners):
    listener = Listener()
    listeners.append(listener)
    stage = make_stage(destinations=[hl7_destination(listener.port, charset="8859/1")])
    stage.receive(study_uid, data=image(study_uid, 0, None, "GB18030"))
    run(stage, tiny_engine)
    assert [state for *_, state, _ in deliveries(stage)] == [DeliveryState.DEAD]
    assert listener.received == []


def test_a_silent_listener_costs_one_timeout_per_round(tmp_path):
    paths = []
    for i in range(3):
        source = make_source([frame(16, 16, seed=i)])
        written = write_study_sr([(source, [make_finding(lesion_mask(16, 16), LesionClass.PU)])], tmp_path / str(i),
                                 fsync=False)
        paths.append(Outgoing(path=written.output.path, sop_class_uid=written.output.sop_class_uid,
                              sop_instance_uid=written.output.sop_instance_uid,
                              study_instance_uid=str(source.StudyInstanceUID), kind=OutputKind.STUDY_SR))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        sender = HL7Sender(HL7.model_validate(hl7_destination(silent.getsockname()[1], ack_timeout_seconds=0.6)))
        started = time.monotonic()
        results = list(sender.send(paths))
    assert [r.outcome for r in results] == [SendOutcome.RETRY] * 3
    assert time.monotonic() - started < 1.2, "one timeout (0.6 s), not one per message"
    assert "no ACK within 0.6 s" in results[0].reason and all("not tried" in r.reason for r in results[1:])
