"""The C-STORE sender: many objects over one association, each sent as stored, a typed result per object."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from gastrolens.config.schema import DicomPeer
from gastrolens.dicom_io.net import send as send_module
from gastrolens.dicom_io.net.send import classify, send_files
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame
from gastrolens.sending import SendOutcome
from pipeline_e2e.peers import start_storescp
from support import free_port


def stored_files(folder: Path, n: int) -> list[tuple[Path, str]]:
    frame, _ = endoscopy_frame(48, 64, None, seed=1)
    study = generate_uid()
    files = []
    for i in range(n):
        ds = as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=study, instance_number=i + 1)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append((path, SECONDARY_CAPTURE))
    return files


def test_send_c_store_still_streams_a_path_when_asked():
    """What the sender leans on: pynetdicom's documented option, read by send_c_store."""
    assert "STORE_SEND_CHUNKED_DATASET" in inspect.getsource(Association.send_c_store)
    send_files([], DicomPeer(name="x", ae_title="X", host="127.0.0.1", port=1), "GASTROLENS")  # a no-op
    from gastrolens.dicom_io.net.pynetdicom_private import send_files_as_stored

    send_files_as_stored()
    assert pynetdicom._config.STORE_SEND_CHUNKED_DATASET is True


def test_many_objects_go_over_one_association_without_being_decoded(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("the file was decoded instead of sent as stored")

    nagle_off = []
    no_delay = send_module.no_delay
    monkeypatch.setattr(send_module, "no_delay", lambda assoc: nagle_off.append(assoc) or no_delay(assoc))
    monkeypatch.setattr(send_module, "dcmread", no_decoding)
    monkeypatch.setattr(pynetdicom.association, "dcmread", no_decoding)
    files = stored_files(tmp_path, 6)
    scp = start_storescp(tmp_path / "peer")
    try:
        peer = DicomPeer(name="pacs", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port)
        results = list(send_files(files, peer, "GASTROLENS"))
    finally:
        scp.stop()
    assert [r.outcome for r in results] == [SendOutcome.SENT] * 6 and {r.status for r in results} == {0}
    assert len(scp.received()) == 6
    echoes = scp.log.count("Received Echo Request")  # start_storescp's readiness checks
    assert scp.log.count("Association Received") - echoes == 1
    assert scp.log.count("Received Store Request") == 6
    assert len(nagle_off) == 1, "TCP_NODELAY set on the association (else 40 ms per object)"
    sent = {pydicom.dcmread(p).SOPInstanceUID for p, _ in files}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in scp.received()} == sent


@pytest.fixture
def implicit_only_peer():
    """A peer that accepts Secondary Capture in Implicit VR Little Endian only."""
    received = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="IMPLICIT")
    ae.add_supported_context(SECONDARY_CAPTURE, [ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield DicomPeer(name="old", ae_title="IMPLICIT", host="127.0.0.1", port=port), received
    server.shutdown()


def test_a_peer_without_the_stored_syntax_gets_a_converted_copy(tmp_path, implicit_only_peer):
    peer, received = implicit_only_peer
    files = stored_files(tmp_path, 2)
    results = list(send_files(files, peer, "GASTROLENS"))
    assert [r.outcome for r in results] == [SendOutcome.SENT] * 2
    assert len(received) == 2


def test_closing_early_releases_the_association(tmp_path, implicit_only_peer):
    peer, received = implicit_only_peer
    results = send_files(stored_files(tmp_path, 3), peer, "GASTROLENS")
    assert next(results).ok
    before = threading.active_count()
    results.close()
    assert len(received) == 1 and threading.active_count() <= before


def test_an_unreachable_peer_is_worth_a_retry_for_every_object(tmp_path):
    peer = DicomPeer(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port())
    results = list(send_files(stored_files(tmp_path, 2), peer, "GASTROLENS", timeout_seconds=5))
    assert [r.outcome for r in results] == [SendOutcome.RETRY] * 2
    assert all(r.status is None and r.reason for r in results)


def test_a_missing_file_is_permanent(tmp_path, implicit_only_peer):
    peer, _ = implicit_only_peer
    (path, sop), = stored_files(tmp_path, 1)
    path.unlink()
    (result,) = send_files([(path, sop)], peer, "GASTROLENS")
    assert result.outcome is SendOutcome.PERMANENT and "missing" in result.reason


@pytest.mark.parametrize("status, outcome", [
    (0x0000, SendOutcome.SENT), (0xB000, SendOutcome.SENT), (0xB007, SendOutcome.SENT),
    (None, SendOutcome.RETRY), (0xA700, SendOutcome.RETRY), (0xA7FF, SendOutcome.RETRY),
    (0xA900, SendOutcome.PERMANENT), (0xC000, SendOutcome.PERMANENT), (0x0122, SendOutcome.PERMANENT),
])
def test_statuses_become_outcomes(status, outcome):
    result = classify(status)
    assert result.outcome is outcome and result.status == status
    assert (result.reason is None) == (outcome is SendOutcome.SENT)


def test_a_jpeg_overlay_goes_decompressed_to_a_peer_without_jpeg(tmp_path):
    """A peer that takes no JPEG Baseline gets the lossy overlay as native RGB, still marked lossy."""
    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    frame, _ = endoscopy_frame(48, 64, None, seed=1)
    source = as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=generate_uid(), jpeg_quality=90)
    from gastrolens.dicom_io.documents import jpeg

    encoded = jpeg.encode_frames([frame])
    source.PixelData, source.PhotometricInterpretation = encoded.pixel_data, "YBR_FULL_422"
    source["PixelData"].VR = "OB"
    source.file_meta.TransferSyntaxUID = jpeg.TRANSFER_SYNTAX
    path = tmp_path / "overlay.dcm"
    source.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="NOJPEG")
    ae.add_supported_context(SECONDARY_CAPTURE, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        (result,) = send_files([(path, SECONDARY_CAPTURE)], DicomPeer(name="old", ae_title="NOJPEG",
                                                                     host="127.0.0.1", port=port), "GASTROLENS")
    finally:
        server.shutdown()
    assert result.outcome is SendOutcome.SENT
    (got,) = received
    assert got.PhotometricInterpretation == "RGB" and got.LossyImageCompression == "01"
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert abs(got.pixel_array.astype(int) - frame).mean() < 4
