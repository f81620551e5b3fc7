"""Orthanc with its DICOMweb plugin as the archive: it pushes a study to GastroLens by C-STORE and gets
SEG, SRs and overlays back by STOW-RS; QIDO-RS on Orthanc then finds them in the source study."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest

from gastrolens.findings import LesionClass, OutputKind
from pipeline_e2e.outputs_check import check_outputs
from pipeline_e2e.peers import (
    DICOMWEB_PLUGIN,
    ORTHANC,
    DatabaseView,
    Orthanc,
    make_study,
    output_kinds,
    pipeline_config,
    wait_for,
)
from support import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (Path(ORTHANC).exists() and Path(DICOMWEB_PLUGIN).exists()),
                                                   reason="needs Orthanc and orthanc-dicomweb")]

LOOKS = [(LesionClass.PU, "jpeg"), (None, "jpeg"), (LesionClass.AGC, "sc")]
SOP_INSTANCE_UID, SOP_CLASS_UID, MODALITY = "00080018", "00080016", "00080060"


def dicomweb_destination(name: str, url: str) -> str:
    return f'[[destinations]]\nkind = "dicomweb"\nname = "{name}"\nurl = "{url}"\ntoken = "not-checked-by-orthanc"\n'


def qido_instances(orthanc: Orthanc, study_uid: str) -> list[dict]:
    response = httpx.get(f"{orthanc.url}/dicom-web/studies/{study_uid}/instances",
                         headers={"Accept": "application/dicom+json"}, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else []


def test_outputs_go_back_by_stow_rs_and_qido_rs_finds_them_in_the_study(tmp_path, sqlite_url, tiny_model, daemons):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port, plugins=[DICOMWEB_PLUGIN])
    orthanc.start()
    view = DatabaseView(sqlite_url)
    try:
        config = pipeline_config(tmp_path, sqlite_url, tiny_model, port=port,
                                 destinations=dicomweb_destination("archive", f"{orthanc.url}/dicom-web"))
        daemon = daemons(config, tmp_path / "gastrolens.toml")
        logs = lambda: f"{daemon.log}\n--- Orthanc ---\n{orthanc.log}"  # noqa: E731
        assert qido_instances(orthanc, "1.2.3") == [], "QIDO-RS answers: the plugin is loaded"

        study = make_study(tmp_path / "study", LOOKS)
        uploaded = [orthanc.upload(path) for path in study.files]
        (orthanc_study,) = {item["ParentStudy"] for item in uploaded}
        orthanc.store_to_gastrolens([orthanc_study])

        wait_for(lambda: view.everything_sent(len(study.files)), 120, "every output sent by STOW-RS", logs=logs)
        outputs = view.outputs()
        kinds = output_kinds(outputs)
        assert kinds[OutputKind.SR.value] == len(LOOKS) and kinds[OutputKind.STUDY_SR.value] == 1
        assert kinds[OutputKind.OVERLAY.value] == len(LOOKS) and kinds[OutputKind.SEG.value] >= 1, kinds

        found = qido_instances(orthanc, study.study_uid)
        uids = {item[SOP_INSTANCE_UID]["Value"][0] for item in found}
        expected = {o.sop_instance_uid for o in outputs}
        assert uids == expected | set(study.sop_uids), "QIDO-RS: the study holds the sources and every output"
        classes = Counter(item[SOP_CLASS_UID]["Value"][0] for item in found
                          if item[SOP_INSTANCE_UID]["Value"][0] in expected)
        assert classes == Counter(o.sop_class_uid for o in outputs)
        assert orthanc.study_ids(study.study_uid) == [orthanc_study], "one study: same Patient ID and Study UID"

        received = check_outputs([orthanc.download(item["ID"]) for item in orthanc.study_instances(study.study_uid)],
                                 study, view)
        assert len(received.image_srs) == len(LOOKS) and received.segs
        events = [e for e in view.events() if e.event_type.value.startswith("delivery.")]
        assert len(events) == len(outputs) and {e.event_type.value for e in events} == {"delivery.sent"}, \
            "one audited attempt per output"
        assert view.audit_intact()
        assert daemon.stop() == 0, daemon.log
    finally:
        view.close()
        orthanc.stop()
