"""Query/Retrieve SCP against real peers: DCMTK findscu, getscu, movescu (and storescp as the move destination).

One study with a Chinese patient name stored in GB18030 goes through the real pipeline
(tiny untrained engine: SEG, SR, overlays, study SR), then the receiver serves it with
the Q/R service wired as the daemon wires it. Bad requests are sent with pynetdicom,
which reports the exact status.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from gastrolens.config import Settings
from gastrolens.daemon.completion import StudyCompletion
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.daemon.pipeline import InferenceStep
from gastrolens.daemon.query_retrieve import DatabaseCatalog
from gastrolens.daemon.receivers import ReceiverPool
from gastrolens.db import Database
from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent, Instance, Output, Quarantined
from gastrolens.dicom_io.net.query_retrieve import (
    COMPREHENSIVE_SR_STORAGE,
    SEGMENTATION_STORAGE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    QueryRetrieve,
)
from gastrolens.dicom_io.net.received import ReceivedInstance
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.findings import LesionClass
from gastrolens.models import Engine, untrained_package
from gastrolens.samples import as_dicom, endoscopy_frame
from gastrolens.storage.store import Store
from pipeline_e2e.peers import StoreSCP, start_storescp
from support import free_port

NAME = "Wang^XiaoDong=王^小东"
IDEOGRAPHIC = "王^小东"


@dataclass
class Node:
    settings: Settings
    db: Database
    store: Store
    receiver: Receiver
    study_uid: str
    storescp: StoreSCP

    @property
    def port(self) -> int:
        return self.receiver.port

    def held(self) -> set[str]:
        """SOP Instance UIDs of every source and output of the study."""
        with self.db.read_session() as session:
            sources = session.scalars(select(Instance.sop_instance_uid)).all()
            outputs = session.scalars(select(Output.sop_instance_uid)).all()
        return set(sources) | set(outputs)

    def queries(self) -> list[AuditEvent]:
        with self.db.read_session() as session:
            return list(session.scalars(
                select(AuditEvent).where(AuditEvent.event_type == AuditEventType.QUERY).order_by(AuditEvent.id)
            ))


def _gb18030_instance(study_uid: str, seed: int) -> bytes:
    frame, _ = endoscopy_frame(60, 80, LesionClass.PU, seed=seed)
    ds = as_dicom(frame, study_uid=study_uid, patient_id="GL-QR-1", accession_number="ACC42")
    ds.SpecificCharacterSet = "GB18030"
    ds.PatientName = NAME
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert IDEOGRAPHIC.encode("gb18030") in data  # really stored in GB18030
    return data


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("qr")
    storescp = start_storescp(tmp)
    url = f"sqlite:///{tmp / 'gastrolens.db'}"
    settings = Settings.model_validate({
        "storage": {"root": str(tmp / "storage")},
        "database": {"url": url},
        "dicom": {"port": 0, "peers": [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port},
                                       {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}],
                  "allowed_calling_aets": ["FINDSCU", "GETSCU", "MOVESCU", "PYNETDICOM"]},
        "scheduler": {"study_quiet_seconds": 0, "output_processes": 0},
    })
    db = Database(url)
    db.upgrade()
    store = Store(settings.storage.root, fsync=False)
    study_uid = generate_uid()
    ingest = DatabaseIngest(store, db, writers=1)
    for seed in (1, 2):
        ingest.ingest(ReceivedInstance(data=_gb18030_instance(study_uid, seed), actor="test", calling_ae="TEST",
                                       peer_address="127.0.0.1", negotiated_sop_class=None, requested_sop_uid=None))
    engine = Engine(untrained_package(classifier_input_size=64, segmenter_input_size=65), device="cpu", batch_size=4)
    step = InferenceStep(settings, db, store, engine, "test")
    try:
        assert step.run_once() is not None
        assert StudyCompletion(settings, db, store, "test").run_once() == 1
    finally:
        step.close()
        engine.close()
    receiver = Receiver(settings.dicom, ingest, services=[QueryRetrieve(settings.dicom, DatabaseCatalog(db, store))])
    receiver.start()
    yield Node(settings, db, store, receiver, study_uid, storescp)
    receiver.stop(drain_seconds=5)
    ingest.close()
    storescp.stop()
    db.dispose()


def dcmtk(tool: str, *args: str | bytes, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """A DCMTK tool by full path; arguments may be bytes (a GB18030 key), output stays bytes."""
    return subprocess.run([f"/usr/bin/{tool}", *args], capture_output=True, timeout=120, cwd=cwd,
                          env={**os.environ, "TCP_NODELAY": "1"})


def findscu(
    node: Node, folder: Path, *keys: str | bytes, aet: str = "FINDSCU", port: int | None = None
) -> list[Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    args: list[str | bytes] = ["-S", "-aet", aet, "-aec", node.settings.dicom.ae_title, "-X", "-od", str(folder)]
    for key in keys:
        args += ["-k", key]
    done = dcmtk("findscu", *args, "127.0.0.1", str(port or node.port))
    assert done.returncode == 0, done.stderr.decode(errors="replace") + done.stdout.decode(errors="replace")
    return [dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def test_find_by_patient_name_in_gb18030(node: Node, tmp_path: Path) -> None:
    answers = findscu(node, tmp_path, b"SpecificCharacterSet=GB18030", b"QueryRetrieveLevel=STUDY",
                      f"PatientName={IDEOGRAPHIC}".encode("gb18030"), b"StudyInstanceUID", b"PatientID",
                      b"NumberOfStudyRelatedInstances", b"ModalitiesInStudy", b"StudyDate")
    assert [str(a.StudyInstanceUID) for a in answers] == [node.study_uid]
    answer = answers[0]
    assert answer.SpecificCharacterSet == "GB18030", "answered in the stored data set's character set"
    assert str(answer.PatientName) == NAME
    assert answer.PatientID == "GL-QR-1"
    assert int(answer.NumberOfStudyRelatedInstances) == len(node.held())
    assert {"ES", "SR"} <= set(answer.ModalitiesInStudy), "the sources and GastroLens's own SRs"
    audited = node.queries()[-1]
    assert audited.actor.startswith("dicom:FINDSCU@") and audited.outcome.value == "success"
    assert '"service":"C-FIND"' in audited.detail and '"rows":1' in audited.detail
    assert f'"patient_name":"{IDEOGRAPHIC}"' in audited.detail


def test_find_by_patient_name_in_utf8_with_wildcard(node: Node, tmp_path: Path) -> None:
    answers = findscu(node, tmp_path / "hit", b"SpecificCharacterSet=ISO_IR 192", b"QueryRetrieveLevel=STUDY",
                      "PatientName=王^小*".encode(), b"StudyInstanceUID", b"AccessionNumber")
    assert [(str(a.StudyInstanceUID), a.AccessionNumber) for a in answers] == [(node.study_uid, "ACC42")]
    assert not findscu(node, tmp_path / "miss", b"SpecificCharacterSet=ISO_IR 192", b"QueryRetrieveLevel=STUDY",
                       "PatientName=李*".encode(), b"StudyInstanceUID")


def test_find_series_and_images_with_matching_keys(node: Node, tmp_path: Path) -> None:
    series = findscu(node, tmp_path / "series", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={node.study_uid}",
                     "SeriesInstanceUID", "Modality=SR", "NumberOfSeriesRelatedInstances")
    assert series and {s.Modality for s in series} == {"SR"}
    images = findscu(node, tmp_path / "images", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={node.study_uid}",
                     f"SeriesInstanceUID={series[0].SeriesInstanceUID}", "SOPInstanceUID",
                     f"SOPClassUID={COMPREHENSIVE_SR_STORAGE}")
    assert len(images) == int(series[0].NumberOfSeriesRelatedInstances)
    assert {i.SOPClassUID for i in images} == {COMPREHENSIVE_SR_STORAGE}
    dated = findscu(node, tmp_path / "dated", "QueryRetrieveLevel=STUDY", "StudyDate=19000101-19001231",
                    "StudyInstanceUID", "PatientID=GL-QR-?")
    assert dated == [], "no study in 1900"
    by_id = findscu(node, tmp_path / "id", "QueryRetrieveLevel=STUDY", "PatientID=GL-QR-?", "StudyInstanceUID")
    assert [str(a.StudyInstanceUID) for a in by_id] == [node.study_uid]


def getscu(node: Node, folder: Path, port: int | None = None) -> set[str]:
    """C-GET the node's study into ``folder``; the SOP Instance UIDs received."""
    folder.mkdir(parents=True, exist_ok=True)
    done = dcmtk("getscu", "-S", "-aet", "GETSCU", "-aec", node.settings.dicom.ae_title, "-od", str(folder),
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={node.study_uid}",
                 "127.0.0.1", str(port or node.port))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.iterdir()}


def test_get_retrieves_sources_and_outputs(node: Node, tmp_path: Path) -> None:
    assert getscu(node, tmp_path) == node.held()
    started, finished = node.queries()[-2:]
    total = len(node.held())
    assert '"service":"C-GET"' in started.detail and '"status":"0xFF00"' in started.detail
    assert f'"rows":{total}' in started.detail
    assert f'"completed":{total}' in finished.detail and '"failed":0' in finished.detail
    assert '"status":"0x0000"' in finished.detail and finished.outcome.value == "success"


def test_get_with_a_file_gone_sends_the_rest_and_audits_the_failure(node: Node, tmp_path: Path) -> None:
    with node.db.read_session() as session:
        victim = session.scalars(select(Output).order_by(Output.id)).first()
    assert victim is not None
    path = node.store.absolute(victim.file_path)
    aside = tmp_path / "aside.dcm"
    path.rename(aside)
    try:
        folder = tmp_path / "get"
        folder.mkdir()
        dcmtk("getscu", "-S", "-aet", "GETSCU", "-aec", node.settings.dicom.ae_title, "-od", str(folder),
              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={node.study_uid}",
              "127.0.0.1", str(node.port))
        received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.iterdir()}
    finally:
        aside.rename(path)
    assert received == node.held() - {victim.sop_instance_uid}
    finished = node.queries()[-1]
    assert '"status":"0xB000"' in finished.detail and '"failed":1' in finished.detail
    assert finished.outcome.value == "warning"
    audited = node.queries()[-1]
    assert '"service":"C-GET"' in audited.detail and f'"rows":{len(node.held())}' in audited.detail


def movescu(node: Node, destination: str, *options: str, port: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """C-MOVE the node's study to ``destination``."""
    return dcmtk("movescu", *options, "-S", "-aet", "MOVESCU", "-aec", node.settings.dicom.ae_title,
                 "-aem", destination, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={node.study_uid}",
                 "127.0.0.1", str(port or node.port))


def test_move_to_a_configured_peer(node: Node) -> None:
    before = set(node.storescp.received())
    done = movescu(node, "STORESCP")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    moved = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in set(node.storescp.received()) - before}
    assert moved == node.held()
    finished = node.queries()[-1]
    assert '"service":"C-MOVE"' in finished.detail and '"destination":"STORESCP"' in finished.detail
    assert f'"completed":{len(moved)}' in finished.detail and '"status":"0x0000"' in finished.detail


def test_move_to_a_peer_over_tls(node: Node, tmp_path: Path) -> None:
    """A peer with [dicom.peers.tls] enabled is reached over TLS and its certificate checked against its CA."""
    from dicom_io.net.test_tls import _make_ca, _make_leaf

    _make_ca(tmp_path, "ca")
    _make_leaf(tmp_path, "server", "ca", "localhost",
               "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    port = free_port()
    scp = subprocess.Popen(["/usr/bin/storescp", "+tls", str(tmp_path / "server.key"), str(tmp_path / "server.crt"),
                            "-ic", "+xa", "-aet", "TLSSCP", "-od", str(inbox), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
    peer = {"ae_title": "TLSSCP", "host": "127.0.0.1", "port": port,
            "tls": {"enabled": True, "ca": str(tmp_path / "ca.crt")}}
    dicom = node.settings.dicom.model_validate({**node.settings.dicom.model_dump(), "port": 0, "peers": [peer]})
    ingest = DatabaseIngest(node.store, node.db, writers=1)
    receiver = Receiver(dicom, ingest, services=[QueryRetrieve(dicom, DatabaseCatalog(node.db, node.store))])
    receiver.start()
    try:
        time.sleep(0.5)  # storescp binds
        done = movescu(node, "TLSSCP", port=receiver.port)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        moved = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in inbox.iterdir()}
        assert moved == node.held()
    finally:
        receiver.stop(drain_seconds=5)
        ingest.close()
        scp.terminate()
        scp.wait(timeout=10)


def test_move_to_an_unreachable_peer_fails_with_a801_and_is_audited(node: Node) -> None:
    done = movescu(node, "DOWN", "-d")
    output = (done.stdout + done.stderr).decode(errors="replace").lower()
    assert "dimse status                  : 0xa801" in output, output
    deadline = time.monotonic() + 10  # audited when pynetdicom drops the handler, just after it answered
    while '"destination":"DOWN"' not in node.queries()[-1].detail and time.monotonic() < deadline:
        time.sleep(0.05)
    finished = node.queries()[-1]
    assert '"destination":"DOWN"' in finished.detail and '"status":"0xA801"' in finished.detail
    assert "could not be reached" in finished.detail and finished.outcome.value == "failure"


def test_move_to_an_unknown_destination_fails_with_a801(node: Node) -> None:
    done = movescu(node, "NOBODY", "-d")
    output = (done.stdout + done.stderr).decode(errors="replace").lower()
    assert "dimse status                  : 0xa801" in output, output
    audited = node.queries()[-1]
    assert '"status":"0xA801"' in audited.detail and '"destination":"NOBODY"' in audited.detail


def test_a_calling_ae_not_on_the_allow_list_is_refused(node: Node, tmp_path: Path) -> None:
    done = dcmtk("findscu", "-S", "-aet", "INTRUDER", "-aec", node.settings.dicom.ae_title,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "127.0.0.1", str(node.port))
    assert done.returncode != 0
    with node.db.read_session() as session:
        rejected = session.scalars(select(AuditEvent.actor).where(
            AuditEvent.event_type == AuditEventType.ASSOCIATION_REJECTED)).all()
    assert any(actor.startswith("dicom:INTRUDER@") for actor in rejected)


def test_served_by_receiver_processes(node: Node, tmp_path: Path) -> None:
    """The daemon's receiver processes wire Q/R themselves (daemon.dicom_services), each with its own engine."""
    settings = node.settings.model_copy(update={"dicom": node.settings.dicom.model_copy(update={"port": 0})})
    pool = ReceiverPool(settings, 2)
    pool.start()
    try:
        for attempt in range(2):  # two connections: both processes answer
            answers = findscu(node, tmp_path / f"find{attempt}", "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                              "PatientID=GL-QR-1", port=pool.port)
            assert [str(a.StudyInstanceUID) for a in answers] == [node.study_uid]
        assert getscu(node, tmp_path / "get", port=pool.port) == node.held()
    finally:
        pool.stop(drain_seconds=5)


# -- bad requests, with the exact status ------------------------------------------------------------


def _identifier(**keys: object) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _find(port: int, identifier: Dataset) -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="GASTROLENS")
    assert assoc.is_established
    try:
        return [(int(status.Status), answer) for status, answer in assoc.send_c_find(identifier, STUDY_ROOT_FIND)]
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.parametrize(("keys", "status"), [
    ({"PatientName": "*"}, 0xA900),  # no Query/Retrieve Level
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, 0xA900),  # not a Study Root level
    ({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": ""}, 0xA900),  # the study's unique key is missing
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20251301"}, 0xC000),  # not a date
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.03"}, 0xC000),  # not a UID
], ids=["no-level", "patient-level", "series-without-study", "bad-date", "bad-uid"])
def test_bad_find_gets_the_standard_status_and_an_audit_row(node: Node, keys: dict[str, object], status: int) -> None:
    assert _find(node.port, _identifier(**keys)) == [(status, None)]
    audited = node.queries()[-1]
    assert audited.outcome.value == "failure" and f'"status":"0x{status:04X}"' in audited.detail


@pytest.mark.parametrize("model", [STUDY_ROOT_GET, STUDY_ROOT_MOVE], ids=["get", "move"])
def test_retrieve_without_the_unique_key_is_refused(node: Node, model: str) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.dicom.ae_title)
    assert assoc.is_established
    identifier = _identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=node.study_uid)
    try:
        if model == STUDY_ROOT_GET:
            responses = list(assoc.send_c_get(identifier, model))
        else:
            responses = list(assoc.send_c_move(identifier, "STORESCP", model))
    finally:
        assoc.release()
    assert int(responses[-1][0].Status) == 0xA900


def test_an_output_sop_class_negotiated_for_get_cannot_be_stored(node: Node) -> None:
    """SEG is offered for C-GET (requestor as SCP); a plain C-STORE of one is refused with 0x0122 and kept."""
    frame, _ = endoscopy_frame(60, 80, LesionClass.PU, seed=3)
    ds = as_dicom(frame, study_uid=node.study_uid)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SEGMENTATION_STORAGE
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(SEGMENTATION_STORAGE, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.settings.dicom.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert int(status.Status) == 0x0122
    assert str(ds.SOPInstanceUID) not in node.held()
    with node.db.read_session() as session:
        kept = session.scalars(select(Quarantined.sop_instance_uid)).all()
    assert str(ds.SOPInstanceUID) in kept


def test_a_find_matching_more_than_max_find_results_is_refused_whole(node: Node) -> None:
    """Over ``[dicom] max_find_results`` the C-FIND gets 0xA700 and no answers (never a list cut short that
    ends in Success); at or under it the answers come as usual."""
    series = _identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=node.study_uid, SeriesInstanceUID="")
    study = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=node.study_uid)
    every_series = _find(node.port, series)
    assert len(every_series) > 3 and {s for s, _ in every_series[:-1]} == {0xFF00}  # sources, SEG, SRs, overlays
    limit = len(every_series) - 2  # one fewer than the series held
    dicom = node.settings.dicom.model_copy(update={"port": 0, "max_find_results": limit})
    ingest = DatabaseIngest(node.store, node.db, writers=1)
    receiver = Receiver(dicom, ingest, services=[QueryRetrieve(dicom, DatabaseCatalog(node.db, node.store))])
    receiver.start()
    try:
        too_many = _find(receiver.port, series)
        one = _find(receiver.port, study)
    finally:
        receiver.stop(drain_seconds=5)
        ingest.close()
    assert too_many == [(0xA700, None)]
    assert [s for s, _ in one] == [0xFF00, 0x0000]
    refused = node.queries()[-2]
    assert refused.outcome.value == "failure" and '"status":"0xA700"' in refused.detail
    assert f"more than {limit} matches" in refused.detail


def test_a_find_with_keys_gastrolens_does_not_support_gets_the_pending_warning(node: Node) -> None:
    """0xFF01 when a key is not kept (returned empty) or has a value GastroLens does not match on; audited."""
    kept = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=node.study_uid, PatientName="")
    not_kept = _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=node.study_uid, PatientName="",
                           PatientBirthDate="")
    assert [s for s, _ in _find(node.port, kept)] == [0xFF00, 0x0000]
    answers = _find(node.port, not_kept)
    assert [s for s, _ in answers] == [0xFF01, 0x0000]
    first = answers[0][1]
    assert first is not None and first["PatientBirthDate"].is_empty and str(first.PatientName) == NAME
    audited = node.queries()[-1]
    assert '"status":"0x0000"' in audited.detail and "optional keys not supported: PatientBirthDate" in audited.detail
