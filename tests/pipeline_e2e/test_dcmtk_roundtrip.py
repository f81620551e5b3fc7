"""DCMTK on both sides: storescu pushes a study into GastroLens, storescp receives every output."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from gastrolens.findings import LesionClass
from pipeline_e2e.outputs_check import check_outputs
from pipeline_e2e.peers import STORESCP, DatabaseView, dicom_destination, make_study, pipeline_config, wait_for
from support import storescu

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(STORESCP).exists(), reason="needs DCMTK")]


def test_storescu_in_storescp_out(tmp_path, sqlite_url, tiny_model, daemons, storescp):
    study = make_study(tmp_path / "study", [(LesionClass.PU, "jpeg"), (None, "jpeg"), (LesionClass.AGC, "sc")])
    config = pipeline_config(tmp_path, sqlite_url, tiny_model,
                             destinations=dicom_destination("pacs", storescp.ae_title, storescp.port))
    daemon = daemons(config, tmp_path / "gastrolens.toml")
    view = DatabaseView(sqlite_url)
    try:
        jpeg, sc = study.files[:2], study.files[2:]
        for files in (jpeg, sc):
            sent = storescu(daemon.port, *files)
            assert sent.returncode == 0, sent.stderr
        logs = lambda: f"{daemon.log}\n--- storescp ---\n{storescp.log}"  # noqa: E731
        wait_for(lambda: view.everything_sent(len(study.files)), 90, "every output sent to storescp", logs=logs)

        expected = {o.sop_instance_uid for o in view.outputs()}
        wait_for(lambda: len(storescp.received()) >= len(expected), 10, "storescp to write every file", logs=logs)
        files = storescp.received()
        got = [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in files]
        assert sorted(got) == sorted(expected), "storescp holds other objects than GastroLens recorded as sent"
        received = check_outputs([path.read_bytes() for path in files], study, view)
        assert received.segs, "the tiny model's raised segmenter bias should outline at least one lesion"

        status = json.loads(daemon.gastrolens("status", "--json").stdout)
        assert status["instances"]["done"] == len(study.files)
        assert status["outputs"] == {"pending": 0, "sent": len(expected), "retrying": 0, "dead": 0}
        assert view.audit_intact()
        assert daemon.stop() == 0, daemon.log
    finally:
        view.close()
