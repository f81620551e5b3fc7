"""Storage commitment with Orthanc as the PACS, and MPPS-driven study completion with a pynetdicom workstation,
against `gastrolens serve` (receiver processes and worker in their own processes, signals through the database)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_services_support import mpps_create, mpps_set, status_of, workstation
from gastrolens.db.states import AuditEventType
from gastrolens.dicom_io.net.services import MODALITY_PERFORMED_PROCEDURE_STEP as MPPS
from gastrolens.findings import LesionClass
from pipeline_e2e.peers import ORTHANC, DatabaseView, detail, make_study, wait_for
from support import basic_config, free_port, storescu

pytestmark = [pytest.mark.slow]

LOOKS = [(LesionClass.PU, "jpeg"), (None, "jpeg"), (LesionClass.AGC, "jpeg")]
QUIET_SECONDS = 30


def _config(tmp: Path, db_url: str, model: Path, port: int, extra: str = "") -> str:
    return basic_config(tmp, db_url, port=port, extra=f"""
[model]
package = "{model}"
device = "cpu"
batch_size = 8

[scheduler]
interval_seconds = 2
study_quiet_seconds = {QUIET_SECONDS}
mpps_grace_seconds = 3

{extra}
""")


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason="needs Orthanc")
def test_orthanc_sends_a_study_with_storage_commitment_and_gets_it_committed(
        tmp_path, sqlite_url, tiny_model, daemons, orthanc_factory):
    port = free_port()
    orthanc = orthanc_factory(port)
    peer = f'[[dicom.peers]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
    daemon = daemons(_config(tmp_path, sqlite_url, tiny_model, port, peer), tmp_path / "gastrolens.toml")
    view = DatabaseView(sqlite_url)
    logs = lambda: f"{daemon.log}\n--- Orthanc ---\n{orthanc.log}"  # noqa: E731
    try:
        study = make_study(tmp_path / "study", LOOKS)
        uploaded = [orthanc.upload(path) for path in study.files]
        (orthanc_study,) = {item["ParentStudy"] for item in uploaded}
        response = httpx.post(orthanc.url + "/modalities/gastrolens/store", timeout=120,
                              json={"Resources": [orthanc_study], "Synchronous": True, "StorageCommitment": True})
        assert response.status_code == 200, f"{response.text}\n{logs()}"
        stored = response.json()
        transaction = stored.get("StorageCommitmentTransactionUID")
        assert transaction, f"Orthanc asked for no storage commitment: {stored}"
        report = wait_for(lambda: _finished(orthanc.url, transaction), 60,
                          "Orthanc to receive the storage commitment report", logs=logs)
        assert report["Status"] == "Success", report
        assert sorted(i["SOPInstanceUID"] for i in report["Success"]) == sorted(study.sop_uids)
        assert not report["Failures"]

        # A request naming an instance GastroLens never received comes back failed (0x0112).
        never = generate_uid()
        sop_class = str(dcmread(study.files[0], stop_before_pixels=True).SOPClassUID)
        response = httpx.post(orthanc.url + "/modalities/gastrolens/storage-commitment", timeout=60, json={
            "DicomInstances": [{"SOPClassUID": sop_class, "SOPInstanceUID": study.sop_uids[0]},
                               {"SOPClassUID": sop_class, "SOPInstanceUID": never}]})
        assert response.status_code == 200, f"{response.text}\n{logs()}"
        failed = wait_for(lambda: _finished(orthanc.url, response.json()["ID"]), 60,
                          "Orthanc to receive the failure report", logs=logs)
        assert failed["Status"] == "Failure", failed
        assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in failed["Failures"]] == [(never, 0x0112)]
        assert [i["SOPInstanceUID"] for i in failed["Success"]] == [study.sop_uids[0]]

        requested = view.events(AuditEventType.COMMITMENT_REQUESTED)
        reported = view.events(AuditEventType.COMMITMENT_REPORTED)
        assert len(requested) == len(reported) == 2
        print("storage commitment reports went", [detail(e)["via"] for e in reported])
        assert all(detail(e)["delivered"] for e in reported)
        assert view.audit_intact()
        assert daemon.stop() == 0, daemon.log
    finally:
        view.close()


def _finished(url: str, transaction: str) -> dict | None:
    response = httpx.get(f"{url}/storage-commitment/{transaction}", timeout=10)
    if response.status_code != 200:
        return None
    report = response.json()
    return report if report.get("Status") in ("Success", "Failure") else None


def test_mpps_completed_completes_the_study_without_waiting_for_the_quiet_timer(
        tmp_path, sqlite_url, tiny_model, daemons):
    port = free_port()
    daemon = daemons(_config(tmp_path, sqlite_url, tiny_model, port), tmp_path / "gastrolens.toml")
    view = DatabaseView(sqlite_url)
    try:
        study = make_study(tmp_path / "study", LOOKS)
        series = str(dcmread(study.files[0], stop_before_pixels=True).SeriesInstanceUID)
        sop_class = str(dcmread(study.files[0], stop_before_pixels=True).SOPClassUID)
        step_uid = generate_uid()
        ae, assoc = workstation(daemon.port)
        try:
            assert status_of(assoc.send_n_create(mpps_create(study.study_uid), MPPS, step_uid)[0]) == 0
            assert storescu(daemon.port, *study.files).returncode == 0
            last_image = time.time()
            status, _ = assoc.send_n_set(
                mpps_set("COMPLETED", {series: [(sop_class, uid) for uid in study.sop_uids]}), MPPS, step_uid)
            completed_at = time.time()
            assert status_of(status) == 0
        finally:
            assoc.release()
            ae.shutdown()
        (reported,) = wait_for(lambda: view.events(AuditEventType.STUDY_REPORTED), QUIET_SECONDS,
                               "the study SR after MPPS COMPLETED", logs=lambda: daemon.log)
        latency = _epoch(reported.at) - completed_at
        last_done = max(_epoch(e.at) for e in view.events(AuditEventType.INSTANCE_DONE))
        print(f"MPPS COMPLETED -> study SR recorded: {latency:.2f} s (last image -> SR "
              f"{(_epoch(reported.at) - last_image):.2f} s, of which last image done -> SR "
              f"{(_epoch(reported.at) - last_done):.2f} s; quiet timer: {QUIET_SECONDS} s after the last image)")
        assert _epoch(reported.at) - last_image < QUIET_SECONDS, "reported no sooner than the quiet timer would have"
        assert detail(reported)["images"] == len(study.files)
        (sr_output,) = [o for o in view.outputs() if o.sop_instance_uid == reported.sop_uid]
        assert dcmread(tmp_path / "storage" / sr_output.file_path).CompletionFlag == "COMPLETE"
        assert len(view.events(AuditEventType.PROCEDURE_STEP_CREATED)) == 1
        assert json.loads(view.events(AuditEventType.PROCEDURE_STEP_UPDATED)[0].detail)["status"] == "COMPLETED"

        # The signal alone: a second procedure whose images are all processed before its N-SET.
        second = make_study(tmp_path / "second", LOOKS, seed=10, patient_id="GL-E2E-2")
        assert storescu(daemon.port, *second.files).returncode == 0
        wait_for(lambda: view.all_done(len(study.files) + len(second.files)), 60, "the second study's inference",
                 logs=lambda: daemon.log)
        step_uid = generate_uid()
        ae, assoc = workstation(daemon.port)
        try:
            assert status_of(assoc.send_n_create(mpps_create(second.study_uid), MPPS, step_uid)[0]) == 0
            series = str(dcmread(second.files[0], stop_before_pixels=True).SeriesInstanceUID)
            status, _ = assoc.send_n_set(
                mpps_set("COMPLETED", {series: [(sop_class, uid) for uid in second.sop_uids]}), MPPS, step_uid)
            completed_at = time.time()
            assert status_of(status) == 0
        finally:
            assoc.release()
            ae.shutdown()
        reports = wait_for(lambda: [e for e in view.events(AuditEventType.STUDY_REPORTED)
                                    if e.study_uid == second.study_uid], QUIET_SECONDS - 5,
                           "the second study SR", logs=lambda: daemon.log)
        signal_latency = _epoch(reports[0].at) - completed_at
        print(f"images already processed: MPPS COMPLETED -> study SR recorded {signal_latency:.2f} s")
        assert signal_latency < 5
        assert view.audit_intact()
        assert daemon.stop() == 0, daemon.log
    finally:
        view.close()


def _epoch(at: datetime) -> float:
    from datetime import timezone

    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()
