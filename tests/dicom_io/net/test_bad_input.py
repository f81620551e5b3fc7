"""Bad input is answered with the right failure status, quarantined with its reason, and audited."""

from __future__ import annotations

import json
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import func, select

from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent, Instance, Quarantined, Study
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
    syntax = str(read_file_meta_info(path).TransferSyntaxUID)
    ae.add_requested_context(SC, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="GASTROLENS")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def sc_dataset(study_uid: str | None = None) -> Dataset:
    frame, _ = endoscopy_frame(32, 40, LesionClass.PU)
    return as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=study_uid)


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


def encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def patched(old: bytes, new: bytes):
    """A valid file with its first ``old`` bytes (after the file meta) replaced by ``new``.

    The Study Instance UID is 10 bytes long: read as FD (8 bytes a value) it cannot parse.
    """

    def make(tmp: Path) -> Path:
        data = encoded(sc_dataset(study_uid="1.2.3.4.5"))
        at = data.index(old, 132 + 200)
        path = tmp / "in.dcm"
        path.write_bytes(data[:at] + new + data[at + len(old) :])
        return path

    return make


STUDY_UID_TAG = b"\x20\x00\x0d\x00"


def geometry(**attributes: object):
    def make(tmp: Path) -> Path:
        ds = sc_dataset()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        return save(ds, tmp / "in.dcm")

    return make


def encapsulated_frames(frames: int):
    def make(tmp: Path) -> Path:
        frame, _ = endoscopy_frame(32, 40, LesionClass.PU)
        ds = as_dicom(frame, sop_class=SECONDARY_CAPTURE, jpeg_quality=90)
        ds.NumberOfFrames = frames
        return save(ds, tmp / "in.dcm")

    return make


def deflate_bomb(tmp: Path) -> Path:
    """A deflated data set whose 64 MiB of zeros travel as about 64 KiB."""
    ds = sc_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = encoded(ds)
    meta_end = 132 + 12 + int.from_bytes(head[140:144], "little")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(b"\0" * (64 * 2**20 + 8)) + compressor.flush()
    path = tmp / "in.dcm"
    path.write_bytes(head[:meta_end] + body)
    return path


def many_items(tmp: Path) -> Path:
    ds = sc_dataset()
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(100_001)])
    return save(ds, tmp / "in.dcm")


def deep_nesting(tmp: Path) -> Path:
    ds = sc_dataset()
    inner = Dataset()
    ds.ReferencedImageSequence = Sequence([inner])
    for _ in range(40):
        nested = Dataset()
        inner.ReferencedImageSequence = Sequence([nested])
        inner = nested
    return save(ds, tmp / "in.dcm")


def zeros(tmp: Path) -> Path:
    """Millions of empty elements: pydicom would build an object for each."""
    head = encoded(sc_dataset())
    meta_end = 132 + 12 + int.from_bytes(head[140:144], "little")
    path = tmp / "in.dcm"
    path.write_bytes(head[:meta_end] + b"\0" * 64 * 2**20)
    return path


def truncated(tmp: Path) -> Path:
    data = encoded(sc_dataset())
    path = tmp / "in.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


CASES = {
    "Study Instance UID with VR FD": (patched(STUDY_UID_TAG + b"UI", STUDY_UID_TAG + b"FD"), 0xC000, "does not parse"),
    "header byte flipped into an unknown VR": (
        patched(STUDY_UID_TAG + b"UI", STUDY_UID_TAG + b"U\x01"),
        0xC000,
        "does not parse",
    ),
    "65535 x 65535 native": (geometry(Rows=65535, Columns=65535), 0xA900, "image geometry"),
    "2**31-1 native frames": (geometry(NumberOfFrames=2**31 - 1), 0xA900, "image geometry"),
    "2**31-1 encapsulated frames": (encapsulated_frames(2**31 - 1), 0xA900, "image geometry"),
    "more frames than the offset table": (encapsulated_frames(3), 0xA900, "Basic Offset Table lists 1"),
    "Pixel Data shorter than Rows x Columns": (geometry(Rows=64), 0xA900, "need 7680 bytes of Pixel Data"),
    "truncated in the Pixel Data": (truncated, 0xC000, "truncated"),
    "deflate bomb": (deflate_bomb, 0xA900, "inflates to more than"),
    "100001 sequence items": (many_items, 0xA900, "sequence items"),
    "64 MiB of zero bytes": (zeros, 0xA900, "sequence items"),
    "sequences nested 41 deep": (deep_nesting, 0xA900, "nested more than"),
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


def test_hostile_header_strings_are_stored_clipped(receiver, tmp_path):
    """Values wider than their VR or holding NUL would fail the commit (PostgreSQL) and so the peer forever."""
    ds = sc_dataset()
    ds.PatientID = "P\x00" + "9" * 200
    ds.StudyDate = "20250101T120000"
    ds.AccessionNumber = "A" * 40
    ds.SeriesNumber = str(2**40)
    assert send_file(receiver.port, save(ds, tmp_path / "in.dcm")) == 0x0000
    with receiver.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
        study = s.scalars(select(Study)).one()
        assert study.patient_id == "P" + "9" * 63
        assert len(study.study_date or "") <= 8


def test_native_ybr_full_422_is_judged_by_its_subsampled_size(receiver, tmp_path):
    """YBR_FULL_422 native data holds two bytes a pixel, not three (pydicom's own test file)."""
    import pydicom

    source = Path(pydicom.__file__).parent / "data" / "test_files" / "SC_ybr_full_422_uncompressed.dcm"
    path = tmp_path / "ybr.dcm"
    path.write_bytes(source.read_bytes())
    assert send_file(receiver.port, path) == 0x0000
