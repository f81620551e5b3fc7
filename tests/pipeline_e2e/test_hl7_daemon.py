"""`gastrolens serve` with an HL7 destination: storescu pushes a study, the daemon's delivery step
sends the study conclusion as an ORU^R01 to an hl7apy MLLP listener, which parses and ACKs it;
`gastrolens deliveries` lists it with its kind beside the DICOM deliveries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gastrolens.findings import LesionClass
from hl7v2.listener import Listener
from pipeline_e2e.peers import STORESCP, DatabaseView, dicom_destination, make_study, pipeline_config, wait_for
from support import storescu

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(STORESCP).exists(), reason="needs DCMTK")]


def test_the_daemon_sends_the_conclusion_to_an_mllp_listener(tmp_path, sqlite_url, tiny_model, daemons, storescp):
    listener = Listener()
    study = make_study(tmp_path / "study", [(LesionClass.PU, "jpeg"), (None, "sc")], patient_id="GL-HL7-E2E")
    hl7 = (f'[[destinations]]\nkind = "hl7"\nname = "ris"\nhost = "127.0.0.1"\nport = {listener.port}\n'
           'receiving_application = "RIS"\nreceiving_facility = "HOSP"\nack_timeout_seconds = 5\n')
    config = pipeline_config(tmp_path, sqlite_url, tiny_model,
                             destinations=dicom_destination("pacs", storescp.ae_title, storescp.port) + hl7)
    daemon = daemons(config, tmp_path / "gastrolens.toml")
    view = DatabaseView(sqlite_url)
    try:
        sent = storescu(daemon.port, *study.files)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: view.everything_sent(len(study.files)), 90, "every delivery sent", logs=lambda: daemon.log)
        (message,) = listener.received
        assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
        assert message.pid.pid_3.to_er7().startswith("GL-HL7-E2E^")
        assert message.obr.obr_25.to_er7() == "F"
        study_sr = [o for o in view.outputs() if o.kind.value == "study_sr"]
        assert len(study_sr) == 1

        rows = json.loads(daemon.gastrolens("deliveries", "--json").stdout)
        to_ris = [r for r in rows if r["destination"] == "ris"]
        assert [(r["destination_kind"], r["kind"], r["state"]) for r in to_ris] == [("hl7", "study_sr", "sent")]
        assert {r["destination_kind"] for r in rows if r["destination"] == "pacs"} == {"dicom"}
        assert len(rows) == len(view.outputs()) + 1, "every output to pacs, the study SR also to ris"
        assert view.audit_intact()
        assert daemon.stop() == 0, daemon.log
    finally:
        view.close()
        listener.stop()
