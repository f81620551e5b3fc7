"""Orthanc as the PACS: it pushes a study to GastroLens, and gets SEG, SRs and overlays back in the same study."""

from __future__ import annotations

from pathlib import Path

import pytest

from gastrolens.findings import LesionClass
from pipeline_e2e.outputs_check import check_outputs
from pipeline_e2e.peers import ORTHANC, DatabaseView, dicom_destination, make_study, pipeline_config, wait_for
from support import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(ORTHANC).exists(), reason="needs Orthanc")]

LOOKS = [(LesionClass.PU, "jpeg"), (None, "jpeg"), (LesionClass.AGC, "sc"), (LesionClass.EGC_HGIN, "jpeg")]


def test_orthanc_pushes_a_study_and_receives_every_output(tmp_path, sqlite_url, tiny_model, daemons, orthanc_factory):
    port = free_port()
    orthanc = orthanc_factory(port)
    config = pipeline_config(tmp_path, sqlite_url, tiny_model, port=port,
                             destinations=dicom_destination("pacs", "ORTHANC", orthanc.dicom_port))
    daemon = daemons(config, tmp_path / "gastrolens.toml")
    view = DatabaseView(sqlite_url)
    logs = lambda: f"{daemon.log}\n--- Orthanc ---\n{orthanc.log}"  # noqa: E731
    try:
        study = make_study(tmp_path / "study", LOOKS)
        uploaded = [orthanc.upload(path) for path in study.files]
        (orthanc_study,) = {item["ParentStudy"] for item in uploaded}
        orthanc.store_to_gastrolens([orthanc_study])

        wait_for(lambda: view.everything_sent(len(study.files)), 90, "every output sent to Orthanc", logs=logs)
        expected = {o.sop_instance_uid for o in view.outputs()}
        total = len(study.files) + len(expected)
        wait_for(lambda: len(orthanc.study_instances(study.study_uid)) >= total, 30,
                 f"Orthanc to hold {total} instances in the study", logs=logs)

        instances = orthanc.study_instances(study.study_uid)
        uids = sorted(item["MainDicomTags"]["SOPInstanceUID"] for item in instances)
        assert uids == sorted([*study.sop_uids, *expected]), "Orthanc's study holds other objects than expected"
        # One study in Orthanc: the outputs carry the source's Patient ID and Study Instance UID.
        assert orthanc.study_ids(study.study_uid) == [orthanc_study]
        assert len(orthanc.json("/studies")) == 1
        received = check_outputs([orthanc.download(item["ID"]) for item in instances], study, view)
        assert len(received.image_srs) == len(LOOKS)
        assert received.segs, "the tiny model's raised segmenter bias should outline at least one lesion"

        assert view.audit_intact()
        assert daemon.stop() == 0, daemon.log
    finally:
        view.close()
