"""C-STORE with real DCMTK clients: durability, versions, transfer syntaxes, access control."""

from __future__ import annotations

import hashlib
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from gastrolens.db.states import AuditEventType, InstanceState
from gastrolens.db.tables import AuditEvent, Instance, Series, Study
from gastrolens.findings import LesionClass
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame
from support import dcmtk, storescu


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta group, as sent on the wire."""
    raw = path.read_bytes()
    ds = dcmread(BytesIO(raw), stop_before_pixels=True)
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    return raw[meta_end:]


def events(db, event_type: AuditEventType) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)))


def test_echo(receiver):
    assert dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(receiver.port)).returncode == 0


def test_store_is_durable_and_byte_exact(receiver, sample_files):
    for name in ("vl_jpeg", "sc_rgb"):
        result = storescu(receiver.port, sample_files[name])
        assert result.returncode == 0, result.stderr
    with receiver.db.session() as s:
        rows = s.scalars(select(Instance)).all()
        assert len(rows) == 2
        assert s.scalar(select(func.count()).select_from(Study)) == 1
        assert s.scalar(select(func.count()).select_from(Series)) == 2
        for row in rows:
            stored = receiver.store.absolute(row.file_path)
            assert row.state == InstanceState.RECEIVED
            assert row.calling_ae == "ENDO_WS1" and row.peer_address == "127.0.0.1"
            assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
            assert row.size_bytes == stored.stat().st_size
            jpeg = row.transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
            source = sample_files["vl_jpeg"] if jpeg else sample_files["sc_rgb"]
            assert dataset_bytes(stored) == dataset_bytes(source), "the data set must be kept exactly as received"
    received = events(receiver.db, AuditEventType.INSTANCE_RECEIVED)
    assert {e.sop_uid for e in received} == {r.sop_instance_uid for r in rows}
    assert all(e.actor == "dicom:ENDO_WS1@127.0.0.1" for e in received)
    assert not list((receiver.store.root / "instances").rglob("*.part"))


def test_resend_same_content_stores_nothing_new(receiver, sample_files):
    for _ in range(2):
        assert storescu(receiver.port, sample_files["sc_rgb"]).returncode == 0
    with receiver.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 1
    assert len(events(receiver.db, AuditEventType.INSTANCE_DUPLICATE)) == 1
    assert len(list((receiver.store.root / "instances").rglob("*.dcm"))) == 1


def test_resend_different_content_is_a_flagged_new_version(receiver, sample_files, tmp_path):
    changed = dcmread(sample_files["sc_rgb"])
    changed.PatientName = "Changed^Name"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    assert storescu(receiver.port, sample_files["sc_rgb"]).returncode == 0
    assert storescu(receiver.port, changed_path).returncode == 0
    with receiver.db.session() as s:
        rows = s.scalars(select(Instance).order_by(Instance.version)).all()
    assert [r.version for r in rows] == [1, 2]
    assert [r.superseded for r in rows] == [True, False]
    assert [r.state for r in rows] == [InstanceState.RECEIVED, InstanceState.RECEIVED]
    assert rows[0].file_path != rows[1].file_path
    flagged = events(receiver.db, AuditEventType.INSTANCE_NEW_VERSION)
    assert len(flagged) == 1 and flagged[0].outcome.value == "warning"


PYDICOM_SC_FILES = {
    "explicit little endian": "SC_rgb_small_odd.dcm",
    "JPEG baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG-LS": "SC_rgb_jls_lossy_line.dcm",
    "RLE": "SC_rgb_rle.dcm",
    "JPEG 2000 lossless": "GDCMJ2K_TextGBR.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "JPEG-LS lossless": "1.2.840.10008.1.2.4.80",
    "JPEG extended": "JPGExtended.dcm",
    "deflate": "image_dfl.dcm",
    "JPEG baseline RGB": "SC_jpeg_no_color_transform.dcm",
}


@pytest.mark.parametrize("label", PYDICOM_SC_FILES)
def test_transfer_syntax_matrix(receiver, tmp_path, label, db_url):
    if db_url.startswith("postgresql") and label != "JPEG baseline":
        pytest.skip("the matrix is about the DICOM side; one PostgreSQL case is enough")
    ds = _source(PYDICOM_SC_FILES[label])
    syntax = ds.file_meta.TransferSyntaxUID
    if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.7":  # make it a class GastroLens accepts, pixels untouched
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()
    if "SeriesInstanceUID" not in ds:
        ds.SeriesInstanceUID = generate_uid()
    path = tmp_path / "in.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = storescu(receiver.port, path)
    assert result.returncode == 0, result.stderr
    with receiver.db.session() as s:
        row = s.scalars(select(Instance)).one()
    assert row.transfer_syntax_uid == syntax
    stored, sent = dcmread(receiver.store.absolute(row.file_path)), dcmread(path)
    # DCMTK re-serialises what it sends (padding, group lengths), so compare element by element;
    # the compressed pixel stream itself must arrive untouched.
    assert stored == sent
    assert stored.PixelData == sent.PixelData


def _source(name: str) -> Dataset:
    """A bundled pydicom file, or a synthetic frame compressed here when ``name`` is a syntax UID."""
    if name[0].isdigit():
        frame, _ = endoscopy_frame(64, 80, LesionClass.SMT)
        ds = as_dicom(frame, sop_class=SECONDARY_CAPTURE)
        ds.compress(name)
        return ds
    return dcmread(get_testdata_file(name, download=False))


def test_unsupported_sop_class_context_is_rejected(receiver, tmp_path):
    ct = Path(get_testdata_file("CT_small.dcm", download=False))
    result = storescu(receiver.port, ct)
    assert result.returncode != 0 or "no presentation context" in (result.stderr + result.stdout).lower()
    with receiver.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0


def test_calling_ae_outside_allow_list_is_rejected_and_audited(make_receiver):
    running = make_receiver(allowed_calling_aets=("ENDO_WS1",))
    assert dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "GASTROLENS", "127.0.0.1", str(running.port)).returncode != 0
    assert dcmtk("echoscu", "-aet", "ENDO_WS1", "-aec", "GASTROLENS", "127.0.0.1", str(running.port)).returncode == 0
    rejected = events(running.db, AuditEventType.ASSOCIATION_REJECTED)
    assert len(rejected) == 1
    assert "INTRUDER" in rejected[0].detail and rejected[0].actor.startswith("dicom:INTRUDER@")


def test_peer_outside_allowed_networks_is_rejected_and_audited(make_receiver):
    running = make_receiver(allowed_peers=("10.0.0.0/8",))
    assert dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(running.port)).returncode != 0
    rejected = events(running.db, AuditEventType.ASSOCIATION_REJECTED)
    assert len(rejected) == 1 and "allowed_peers" in rejected[0].detail


def test_allowed_network_accepts(make_receiver):
    running = make_receiver(allowed_peers=("127.0.0.0/8",), allowed_calling_aets=("ENDO_WS1",))
    assert dcmtk("echoscu", "-aet", "ENDO_WS1", "-aec", "GASTROLENS", "127.0.0.1", str(running.port)).returncode == 0


def test_associations_beyond_the_maximum_are_rejected(make_receiver):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    running = make_receiver(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", running.port, ae_title="GASTROLENS")
    try:
        assert held.is_established
        assert dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(running.port)).returncode != 0
    finally:
        held.release()
    assert dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(running.port)).returncode == 0
    # pynetdicom audits its own rejections just after answering the peer: allow it a moment
    deadline = time.monotonic() + 5
    while not events(running.db, AuditEventType.ASSOCIATION_REJECTED) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(events(running.db, AuditEventType.ASSOCIATION_REJECTED)) == 1
