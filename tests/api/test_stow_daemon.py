"""STOW-RS as users run it: `gastrolens serve` in a subprocess, ``dicomweb-client`` as the sender."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from gastrolens.api.auth import hash_token
from support import basic_config, free_port, start_daemon, write_config

from .stow_node import SENDER_TOKEN, instance

VIEWER_TOKEN = "viewer-token-for-the-daemon-test-00"


@pytest.mark.parametrize("receiver_processes", [1, 2], ids=["one-process", "receiver-processes"])
def test_dicomweb_client_stores_into_the_daemon(tmp_path: Path, sqlite_url: str, tiny_model: Path,
                                                receiver_processes: int) -> None:
    port = free_port()
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
"""
    config = basic_config(tmp_path, sqlite_url, extra).replace(
        "[storage]", f"receiver_processes = {receiver_processes}\n\n[storage]")
    daemon = start_daemon(write_config(tmp_path / "gastrolens.toml", config))
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
