"""STOW-RS as users run it: `gastrolens serve` in a subprocess, ``dicomweb-client`` as the sender."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from gastrolens.api.auth import hash_token
from support import basic_config, free_port, start_daemon, write_config

from .stow_node import SENDER_TOKEN, instance

VIEWER_TOKEN = "viewer-token-for-the-daemon-test-00"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def daemon_config(tmp_path: Path, sqlite_url: str, tiny_model: Path, port: int, receiver_processes: int) -> str:
    extra = f"""
[api]
enabled = true
port = {port}

[[api.tokens]]
name = "endo-gateway"
role = "sender"
sha256 = "{hash_token(SENDER_TOKEN)}"

[[api.tokens]]
name = "it-desk"
role = "viewer"
sha256 = "{hash_token(VIEWER_TOKEN)}"

[model]
package = "{tiny_model}"

[scheduler]
interval_seconds = 0.5
study_quiet_seconds = 1
"""
    return basic_config(tmp_path, sqlite_url, extra).replace(
        "[storage]", f"receiver_processes = {receiver_processes}\n\n[storage]")


def test_dicomweb_client_stores_into_the_daemon(tmp_path: Path, sqlite_url: str, tiny_model: Path) -> None:
    """Beside receiver processes (the default on a multi-core host): an ingest of the daemon's own."""
    port = free_port()
    daemon = start_daemon(write_config(tmp_path / "gastrolens.toml",
                                       daemon_config(tmp_path, sqlite_url, tiny_model, port, 2)))
    try:
        url = f"http://127.0.0.1:{port}/dicomweb"
        client = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {SENDER_TOKEN}"})
        study_a, study_b = generate_uid(), generate_uid()
        sent = [instance(study_a, number=n, seed=n, jpeg_quality=90) for n in (1, 2, 3)]
        sent.append(instance(study_b, seed=9))

        answer = client.store_instances(sent)

        assert [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence] == [
            ds.SOPInstanceUID for ds in sent]
        assert len(answer.get("FailedSOPSequence", [])) == 0

        mixed = client.store_instances([instance(study_a, seed=20), instance(study_b, seed=21)],
                                       study_instance_uid=study_a)  # 202: one stored, one of another study
        assert len(mixed.ReferencedSOPSequence) == 1
        assert [item.FailureReason for item in mixed.FailedSOPSequence] == [0xA900]

        with pytest.raises(requests.HTTPError) as refused:
            client.store_instances([instance(study_b, seed=22)], study_instance_uid=study_a)
        assert refused.value.response.status_code == 409

        viewer = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})
        with pytest.raises(requests.HTTPError) as forbidden:
            viewer.store_instances([instance(study_a, seed=23)])
        assert forbidden.value.response.status_code == 403

        status = json.loads(daemon.gastrolens("status", "--json").stdout)
        assert sum(status["instances"].values()) == 5 and status["quarantined"] == 2
        stored = sorted(p.name for p in (tmp_path / "storage" / "instances" / study_a).rglob("*.dcm"))
        assert stored == sorted(f"{uid}.dcm" for uid in [ds.SOPInstanceUID for ds in sent[:3]]
                                + [mixed.ReferencedSOPSequence[0].ReferencedSOPInstanceUID])
        assert "intact" in daemon.gastrolens("audit", "verify").stdout
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)


def test_a_web_viewer_finds_the_outputs_of_stowed_images(tmp_path: Path, sqlite_url: str, tiny_model: Path) -> None:
    """One process: STOW-RS in, the pipeline writes SEG, SR and overlay, QIDO-RS and WADO-RS show them."""
    port = free_port()
    daemon = start_daemon(write_config(tmp_path / "gastrolens.toml",
                                       daemon_config(tmp_path, sqlite_url, tiny_model, port, 1)))
    try:
        url = f"http://127.0.0.1:{port}/dicomweb"
        study = generate_uid()
        sent = [instance(study, number=n, seed=n, size=(96, 128), jpeg_quality=90) for n in (1, 2)]
        stored = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {SENDER_TOKEN}"}).store_instances(sent)
        assert len(stored.ReferencedSOPSequence) == 2
        viewer = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            series = viewer.search_for_series(study)
            modalities = sorted(s["00080060"]["Value"][0] for s in series)
            reports = sum(s["00201209"]["Value"][0] for s in series if s["00080060"]["Value"][0] == "SR")
            if reports >= 3:  # two image SRs and the study SR: every output of both images is written
                break
            time.sleep(1)
        else:
            pytest.fail(f"no outputs in QIDO-RS after 120 s: {modalities}\n{daemon.log[-3000:]}")

        by_modality: dict[str, list[str]] = {}
        for s in series:
            by_modality.setdefault(s["00080060"]["Value"][0], []).append(s["0020000E"]["Value"][0])
        for seg_series in by_modality.get("SEG", []):  # only where the (untrained) segmenter found a lesion
            seg_uid = viewer.search_for_instances(study, seg_series)[0]["00080018"]["Value"][0]
            seg = viewer.retrieve_instance(study, seg_series, seg_uid)
            assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.StudyInstanceUID == study
        sources = {ds.SOPInstanceUID for ds in sent}
        overlays = [i for series_uid in by_modality["ES"] for i in viewer.search_for_instances(study, series_uid)
                    if i["00080018"]["Value"][0] not in sources]
        assert len(overlays) == 2
        overlay = overlays[0]
        frames = viewer.retrieve_instance_frames(study, overlay["0020000E"]["Value"][0],
                                                 overlay["00080018"]["Value"][0], [1], media_types=("image/jpeg",))
        assert frames[0][:2] == b"\xff\xd8", "the overlay of a lossy source is JPEG, its frame served as stored"
        metadata = viewer.retrieve_series_metadata(study, by_modality["SR"][0])
        assert all(m["00080016"]["Value"][0].startswith("1.2.840.10008.5.1.4.1.1.88.") for m in metadata)
        assert len(viewer.retrieve_study(study)) == len(viewer.search_for_instances(study))
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)
