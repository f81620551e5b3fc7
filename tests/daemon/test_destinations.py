"""Destinations: a DICOM peer or a folder, chosen by ``kind`` (old configurations still load), each
with one ``send`` that yields sent / retry / permanent, and delivery that sends all due objects of a
destination over one association."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from gastrolens.config import Settings, load_settings
from gastrolens.config.schema import DicomPeer, Folder
from gastrolens.daemon.delivery import DeliveryStep
from gastrolens.daemon.destinations import FolderSender, Outgoing, sender_for
from gastrolens.daemon.pipeline import InferenceStep
from gastrolens.db.states import AuditEventType, DeliveryState
from gastrolens.db.tables import AuditEvent, Delivery, Output
from gastrolens.errors import ConfigError
from gastrolens.sending import SendOutcome
from pipeline_e2e.peers import start_storescp


def destinations(*blocks: dict) -> tuple:
    return Settings.model_validate({"destinations": list(blocks)}).destinations


def test_kind_is_optional_for_existing_configurations(tmp_path):
    peer, folder = destinations({"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104},
                                {"name": "export", "folder": str(tmp_path)})
    assert isinstance(peer, DicomPeer) and peer.kind == "dicom"
    assert isinstance(folder, Folder) and folder.kind == "folder"
    (explicit,) = destinations({"kind": "folder", "name": "export", "folder": str(tmp_path)})
    assert explicit == folder


@pytest.mark.parametrize("block, key, reason", [
    ('name = "pacs"\nhost = "h"\n', "destinations.0", "needs ae_title, host and port (missing: ae_title, port)"),
    ('kind = "dicom"\nname = "pacs"\nfolder = "/x"\nae_title = "A"\nhost = "h"\nport = 1\n',
     "destinations.0.dicom.folder", "unknown key"),
    ('name = "x"\nae_title = "A"\nhost = "h"\nport = 1\nfolder = "/x"\n', "destinations.0", "not both"),
    ('kind = "ftp"\nname = "x"\n', "destinations.0", "'dicom', 'folder'"),
    ('kind = "folder"\nname = "x"\n', "destinations.0.folder.folder", "Field required"),
    ('name = "p"\nae_title = "A\\\\B"\nhost = "h"\nport = 1\n', "destinations.0.dicom.ae_title",
     "not a valid AE title"),
])
def test_a_bad_destination_names_file_key_and_reason(tmp_path, block, key, reason):
    path = tmp_path / "gastrolens.toml"
    path.write_text(f"[storage]\nroot = '{tmp_path / 'st'}'\n[[destinations]]\n{block}", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert str(path) in message and key in message and reason in message, message


def outgoing(path: Path) -> Outgoing:
    return Outgoing(path=path, sop_class_uid="1.2.840.10008.5.1.4.1.1.7", sop_instance_uid="1.2.3.4",
                    study_instance_uid="1.2.3")


def test_folder_send_yields_typed_outcomes(tmp_path):
    source = tmp_path / "out.dcm"
    source.write_bytes(b"DICM-ish")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the study folder would go")
    good = FolderSender(Folder(name="export", folder=tmp_path / "export"), fsync=False)
    bad = FolderSender(Folder(name="export", folder=blocked), fsync=False)
    (ok,) = good.send([outgoing(source)])
    assert ok.outcome is SendOutcome.SENT
    assert (tmp_path / "export" / "1.2.3" / "1.2.3.4.dcm").read_bytes() == b"DICM-ish"
    (full,) = bad.send([outgoing(source)])
    assert full.outcome is SendOutcome.RETRY and "cannot copy" in full.reason
    (missing,) = good.send([outgoing(tmp_path / "gone.dcm")])
    assert missing.outcome is SendOutcome.PERMANENT and "missing" in missing.reason


def test_sender_for_each_kind(tmp_path):
    settings = Settings()
    assert sender_for(DicomPeer(name="p", ae_title="P", host="h", port=1), settings).peer.ae_title == "P"
    assert sender_for(Folder(name="f", folder=tmp_path), settings).folder.folder == tmp_path


def test_a_destination_no_longer_configured_is_dead_with_its_reason(make_stage, tiny_engine, study_uid):
    stage = make_stage(destinations=[{"name": "old", "folder": "/nonexistent/old"}])
    stage.receive(study_uid)
    InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
    moved = make_stage(destinations=[{"name": "new", "folder": "/nonexistent/new"}])
    attempts = DeliveryStep(moved.settings, moved.db, moved.store, "w").run_once()
    with stage.db.session() as s:
        states = set(s.scalars(select(Delivery.state)))
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.DELIVERY_DEAD)).first()
    assert attempts > 0 and states == {DeliveryState.DEAD}
    assert "no longer configured" in json.loads(event.detail)["error"]


def test_all_due_outputs_of_a_peer_go_over_one_association(make_stage, tiny_engine, study_uid, tmp_path):
    scp = start_storescp(tmp_path / "peer")
    try:
        stage = make_stage(destinations=[{"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1",
                                          "port": scp.port, "associations": 1}])
        for seed in range(3):
            stage.receive(study_uid, seed=seed)
        InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
        attempts = DeliveryStep(stage.settings, stage.db, stage.store, "w").run_once()
    finally:
        scp.stop()
    with stage.db.session() as s:
        outputs = s.scalar(select(func.count()).select_from(Output))
        sent = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state == DeliveryState.SENT))
    assert attempts == outputs == sent >= 6
    assert len(scp.received()) == outputs
    assert scp.log.count("Association Received") - scp.log.count("Received Echo Request") == 1


def test_a_peer_gets_several_associations_at_once_each_object_once(make_stage, tiny_engine, study_uid, tmp_path,
                                                                    monkeypatch):
    """``associations = 3``: the due objects are shared out over three associations; each
    object is sent once, recorded once and audited once."""
    import gastrolens.daemon.delivery as delivery_module

    monkeypatch.setattr(delivery_module, "MIN_PER_ASSOCIATION", 2)
    scp = start_storescp(tmp_path / "peer")
    try:
        stage = make_stage(destinations=[{"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1",
                                          "port": scp.port, "associations": 3}])
        for seed in range(3):
            stage.receive(study_uid, seed=seed)
        InferenceStep(stage.settings, stage.db, stage.store, tiny_engine, "w").run_once()
        attempts = DeliveryStep(stage.settings, stage.db, stage.store, "w").run_once()
    finally:
        scp.stop()
    with stage.db.session() as s:
        outputs = set(s.scalars(select(Output.sop_instance_uid)))
        rows = list(s.scalars(select(Delivery)))
        sent_events = s.scalar(select(func.count()).select_from(AuditEvent)
                               .where(AuditEvent.event_type == AuditEventType.DELIVERY_SENT))
    assert attempts == len(outputs) == len(rows) == sent_events >= 6
    assert all(r.state is DeliveryState.SENT and r.attempts == 1 and r.claimed_by is None for r in rows)
    assert scp.log.count("Association Received") - scp.log.count("Received Echo Request") == 3
    received = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in scp.received()]
    assert sorted(received) == sorted(outputs)


def test_associations_is_a_dicom_peer_setting_with_a_sane_range():
    (peer,) = destinations({"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104})
    assert isinstance(peer, DicomPeer) and peer.associations == 1
    with pytest.raises(ValueError, match="associations"):
        destinations({"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104, "associations": 0})
