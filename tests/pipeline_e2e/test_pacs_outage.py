"""The PACS goes away: deliveries retry with backoff, each attempt audited with its error;
when the PACS is back (same storage, same ports) everything arrives and is shown as sent."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gastrolens.db.states import AuditEventType
from gastrolens.findings import LesionClass
from pipeline_e2e.outputs_check import check_outputs
from pipeline_e2e.peers import ORTHANC, DatabaseView, detail, dicom_destination, make_study, pipeline_config, wait_for
from support import free_port, storescu

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(ORTHANC).exists(), reason="needs Orthanc")]

LOOKS = [(LesionClass.SMT, "jpeg"), (None, "jpeg"), (LesionClass.PU, "jpeg")]


def test_orthanc_down_then_back(tmp_path, sqlite_url, tiny_model, daemons, orthanc_factory):
    port = free_port()
    orthanc = orthanc_factory(port)
    config = pipeline_config(tmp_path, sqlite_url, tiny_model, port=port,
                             destinations=dicom_destination("pacs", "ORTHANC", orthanc.dicom_port))
    daemon = daemons(config, tmp_path / "gastrolens.toml")
    view = DatabaseView(sqlite_url)
    logs = lambda: f"{daemon.log}\n--- Orthanc ---\n{orthanc.log}"  # noqa: E731
    try:
        study = make_study(tmp_path / "study", LOOKS, patient_id="GL-OUTAGE")
        for path in study.files:
            orthanc.upload(path)
        orthanc.stop()  # the PACS is down before any result is ready
        sent = storescu(daemon.port, *study.files)  # the endoscopy workstation still sends
        assert sent.returncode == 0, sent.stderr

        def all_retrying_twice() -> bool:
            deliveries = view.deliveries()
            return (view.all_done(len(study.files)) and view.reported_studies() == 1
                    and all(d.state.value == "retrying" and d.attempts >= 2 for d, _ in deliveries))

        wait_for(all_retrying_twice, 90, "every delivery retrying after two failed attempts", logs=logs)
        deliveries = [d for d, _ in view.deliveries()]
        assert all(d.last_error and d.last_status is None for d in deliveries), [d.last_error for d in deliveries]
        retrying = view.events(AuditEventType.DELIVERY_RETRYING)
        assert retrying and all(detail(e)["error"] and detail(e)["next_attempt_at"] for e in retrying)
        assert not view.events(AuditEventType.DELIVERY_SENT, AuditEventType.DELIVERY_DEAD)

        orthanc.start()  # same configuration: same storage, index and ports
        wait_for(lambda: view.everything_sent(len(study.files)), 60, "every output sent once Orthanc is back",
                 logs=logs)
        expected = {o.sop_instance_uid for o in view.outputs()}
        total = len(study.files) + len(expected)
        wait_for(lambda: len(orthanc.study_instances(study.study_uid)) >= total, 30,
                 f"Orthanc to hold {total} instances in the study", logs=logs)
        instances = orthanc.study_instances(study.study_uid)
        check_outputs([orthanc.download(item["ID"]) for item in instances], study, view)

        listed = json.loads(daemon.gastrolens("deliveries", "--json").stdout)
        assert len(listed) == len(expected) and {row["state"] for row in listed} == {"sent"}
        assert all(row["attempts"] >= 3 and row["last_error"] is None for row in listed), listed
        # Each delivery: one `retrying` event per failed attempt, then one `sent`.
        failed = Counter(detail(e)["delivery_id"] for e in view.events(AuditEventType.DELIVERY_RETRYING))
        sent_events = Counter(detail(e)["delivery_id"] for e in view.events(AuditEventType.DELIVERY_SENT))
        for row in listed:
            assert failed[row["id"]] == row["attempts"] - 1 and sent_events[row["id"]] == 1
        assert daemon.stop() == 0, daemon.log
    finally:
        view.close()
