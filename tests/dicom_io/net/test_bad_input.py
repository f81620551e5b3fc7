"""Bad input is answered with the right failure status, quarantined with its reason, and audited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from sqlalchemy import func, select

from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent, Instance, Quarantined
from gastrolens.findings import LesionClass
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame

SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(autouse=True)
def send_files_undecoded(monkeypatch):
    """pynetdicom's chunked send mode streams a file's data set as-is, even one that does not parse."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_file(port: int, path: Path) -> int:
    ae = AE(ae_title="ENDO_WS1")
    ae.add_requested_context(SC, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="GASTROLENS")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def sc_dataset() -> Dataset:
    frame, _ = endoscopy_frame(32, 40, LesionClass.PU)
    return as_dicom(frame, sop_class=SECONDARY_CAPTURE)


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def without(keyword: str):
    def make(tmp: Path) -> Path:
        ds = sc_dataset()
        delattr(ds, keyword)
        return save(ds, tmp / "in.dcm")

    return make


def unparseable(tmp: Path) -> Path:
    ds = sc_dataset()
    path = tmp / "in.dcm"
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta, enforce_standard=True)
        fh.write(b"\x08\x00\x16\x00UI\xff\x7fgarbage-that-claims-to-be-long")
    return path


def escaping_uid(tmp: Path) -> Path:
    ds = sc_dataset()
    ds.StudyInstanceUID = "1.2.3/../../../../tmp/escaped"
    return save(ds, tmp / "in.dcm")


def sop_class_mismatch(tmp: Path) -> Path:
    ds = sc_dataset()
    ds.SOPClassUID = CT  # the data set says CT; the file meta (and so the context) says SC
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.preamble = b"\0" * 128
    path = tmp / "in.dcm"
    ds.save_as(path, enforce_file_format=False)  # keep the file meta exactly as set above
    return path


CASES = {
    "no StudyInstanceUID": (without("StudyInstanceUID"), 0xA900, "missing StudyInstanceUID"),
    "no SeriesInstanceUID": (without("SeriesInstanceUID"), 0xA900, "missing SeriesInstanceUID"),
    "no Pixel Data": (without("PixelData"), 0xA900, "no Pixel Data"),
    "header does not parse": (unparseable, 0xC000, "does not parse"),
    "UID escaping the storage folder": (escaping_uid, 0xA900, "UID grammar"),
    "SOP class differs from context": (sop_class_mismatch, 0xA900, "differs from the negotiated"),
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # the crafted UID is the point
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_quarantined(receiver, tmp_path, case):
    make, expected_status, reason = CASES[case]
    path = make(tmp_path)
    assert send_file(receiver.port, path) == expected_status
    with receiver.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
        quarantined = s.scalars(select(Quarantined)).one()
        assert reason in quarantined.reason
        assert quarantined.status == expected_status
        event = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.INSTANCE_QUARANTINED)).one()
        assert reason in json.loads(event.detail)["reason"]
    kept = receiver.store.absolute(quarantined.file_path)
    assert kept.stat().st_size == quarantined.size_bytes > 0
    assert reason in json.loads(kept.with_suffix(".json").read_text())["reason"]
    assert not list((receiver.store.root / "instances").rglob("*.dcm"))
    assert not list(Path("/tmp").glob("escaped*"))


def test_low_disk_answers_out_of_resources(make_receiver, sample_files):
    running = make_receiver(min_free_mb=10**9)
    assert send_file(running.port, sample_files["sc_rgb"]) == 0xA700
    with running.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
        refused = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.STORE_REFUSED)).one()
        assert "min_free_mb" in refused.detail
    assert not list(running.store.root.rglob("*.dcm"))


def test_database_that_cannot_commit_answers_out_of_resources(make_receiver, sample_files):
    running = make_receiver(upgrade=False)  # no tables: every insert fails
    assert send_file(running.port, sample_files["sc_rgb"]) == 0xA700
    leftovers = [p for p in running.store.root.rglob("*") if p.is_file()]
    assert leftovers == [], "no partial file may stay behind"
