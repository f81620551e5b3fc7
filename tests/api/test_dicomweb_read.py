"""QIDO-RS and WADO-RS over what the node holds, with dicomweb-client as the viewer's side.

The node is filled the way users fill it: sources by STOW-RS, plus an overlay output
(JPEG, as the pipeline writes for lossy sources) recorded as the pipeline records it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid
from sqlalchemy import select

from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import Instance, Output
from gastrolens.findings import OutputKind
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame

from .stow_node import (
    REFERENCED_SOP_SEQUENCE,
    SENDER,
    SENDER_TOKEN,
    VIEWER,
    VIEWER_TOKEN,
    StowNode,
    instance,
    part10,
    sequence,
    stow_node,
)

RETRIEVE_URL = "00081190"
PUBLIC = "https://gastrolens.test/gl"


@dataclass
class Held:
    node: StowNode
    client: DICOMwebClient
    study_a: str
    study_b: str
    native_series: str
    native: list[str]
    jpeg_series: str
    jpeg: str
    overlay_series: str
    overlay: str
    retrieve_urls: list[str]


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    folder = tmp_path_factory.mktemp("wado")
    with stow_node(f"sqlite:///{folder / 'gastrolens.db'}", folder / "storage", public_url=PUBLIC + "/") as node:
        study_a, study_b, native_series = generate_uid(), generate_uid(), generate_uid()
        native = [instance(study_a, series_uid=native_series, number=n, seed=n) for n in (1, 2, 3)]
        jpeg = instance(study_a, seed=7, jpeg_quality=90)
        other = instance(study_b, seed=8)
        for ds in (*native, jpeg, other):
            ds.PatientID = "GL-WADO-1" if ds.StudyInstanceUID == study_a else "GL-WADO-2"
            ds.StudyDate = "20261130" if ds.StudyInstanceUID == study_a else "20261201"
        answer = node.post([part10(ds) for ds in (*native, jpeg, other)])
        assert answer.status_code == 200, answer.text
        urls = [item[RETRIEVE_URL]["Value"][0] for item in sequence(answer, REFERENCED_SOP_SEQUENCE)]
        overlay_series, overlay = generate_uid(), generate_uid()
        frame, _ = endoscopy_frame(48, 64, None, seed=9)
        drawn = as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=study_a, series_uid=overlay_series,
                         sop_uid=overlay, jpeg_quality=95)
        path = f"outputs/{study_a}/overlay-{overlay}.dcm"
        (node.store.root / path).parent.mkdir(parents=True, exist_ok=True)
        drawn.save_as(node.store.root / path, enforce_file_format=True)
        with node.db.session() as session:
            source = session.scalars(select(Instance).where(Instance.sop_instance_uid == jpeg.SOPInstanceUID)).one()
            session.add(Output(kind=OutputKind.OVERLAY, study_id=source.study_id, instance_id=source.id,
                               sop_instance_uid=overlay, series_instance_uid=overlay_series,
                               sop_class_uid=SECONDARY_CAPTURE, file_path=path,
                               model_sha256=hashlib.sha256(b"w").hexdigest()))
        client = DICOMwebClient(url=f"{node.url}/dicomweb", headers=VIEWER)
        yield Held(node, client, study_a, study_b, native_series, [ds.SOPInstanceUID for ds in native],
                   jpeg.SeriesInstanceUID, jpeg.SOPInstanceUID, overlay_series, overlay, urls)


def stored_file(held: Held, sop: str) -> Path:
    with held.node.db.read_session() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).first()
        path = row.file_path if row else session.scalars(select(Output.file_path).where(
            Output.sop_instance_uid == sop)).one()
    return held.node.store.absolute(path)


# -- QIDO-RS --------------------------------------------------------------------------------------


def test_search_studies_with_matching_keys(held: Held) -> None:
    studies = held.client.search_for_studies()
    by_uid = {s["0020000D"]["Value"][0]: s for s in studies}
    assert set(by_uid) == {held.study_a, held.study_b}
    a = by_uid[held.study_a]
    assert a["00100020"]["Value"] == ["GL-WADO-1"]
    assert a["00201206"]["Value"] == [3] and a["00201208"]["Value"] == [5]  # 2 source series + overlay
    assert a["00081190"]["Value"] == [f"{PUBLIC}/dicomweb/studies/{held.study_a}"], "[api] public_url"

    def uids(**filters: str) -> list[str]:
        return [s["0020000D"]["Value"][0] for s in held.client.search_for_studies(search_filters=filters)]

    assert uids(PatientID="GL-WADO-2") == [held.study_b]
    assert uids(PatientID="GL-WADO-*") == sorted(uids(PatientID="GL-WADO-*"), key=[held.study_a, held.study_b].index)
    assert uids(StudyDate="20261201-") == [held.study_b]
    assert uids(StudyDate="20261130") == [held.study_a]
    assert uids(**{"0020000D": held.study_b}) == [held.study_b]
    assert len(held.client.search_for_studies(limit=1)) == 1
    assert held.client.search_for_studies(search_filters={"PatientID": "nobody"}) == []


def test_search_series_and_instances(held: Held) -> None:
    series = {s["0020000E"]["Value"][0]: s for s in held.client.search_for_series(held.study_a)}
    assert set(series) == {held.native_series, held.jpeg_series, held.overlay_series}
    assert series[held.native_series]["00201209"]["Value"] == [3]
    assert series[held.overlay_series]["00080060"]["Value"] == ["ES"], "an overlay keeps its source's modality"
    found = held.client.search_for_instances(held.study_a, held.native_series)
    assert sorted(i["00080018"]["Value"][0] for i in found) == sorted(held.native)
    assert len(held.client.search_for_instances(held.study_a)) == 5


# -- WADO-RS --------------------------------------------------------------------------------------


def test_retrieve_instance_series_and_study_as_stored(held: Held) -> None:
    got = held.client.retrieve_instance(held.study_a, held.overlay_series, held.overlay)
    stored = dcmread(stored_file(held, held.overlay))
    assert got.SOPInstanceUID == held.overlay and got.PixelData == stored.PixelData
    assert sorted(ds.SOPInstanceUID for ds in held.client.retrieve_series(held.study_a, held.native_series)) == sorted(
        held.native)
    assert len(held.client.retrieve_study(held.study_a)) == 5


def test_metadata_without_bulk_data(held: Held) -> None:
    items = held.client.retrieve_series_metadata(held.study_a, held.native_series)
    assert sorted(i["00080018"]["Value"][0] for i in items) == sorted(held.native)
    pixel = items[0]["7FE00010"]
    assert "InlineBinary" not in pixel and pixel["BulkDataURI"].startswith(f"{PUBLIC}/dicomweb/studies/")
    assert items[0]["00100020"]["Value"] == ["GL-WADO-1"]


def test_frames_native_and_jpeg(held: Held) -> None:
    sop = held.native[0]
    native = dcmread(stored_file(held, sop))
    frames = held.client.retrieve_instance_frames(held.study_a, held.native_series, sop, [1])
    assert frames == [native.PixelData]
    overlay = dcmread(stored_file(held, held.overlay))
    jpeg = held.client.retrieve_instance_frames(held.study_a, held.overlay_series, held.overlay, [1],
                                                media_types=("image/jpeg",))
    assert jpeg == [get_frame(overlay.PixelData, 0, number_of_frames=1)] and jpeg[0][:2] == b"\xff\xd8"
    url = (f"{held.node.url}/dicomweb/studies/{held.study_a}/series/{held.overlay_series}/instances/"
           f"{held.overlay}/frames/1")
    labelled = httpx.get(url, headers={**VIEWER, "Accept": 'multipart/related; type="application/octet-stream"; '
                                                           "transfer-syntax=*"})
    assert "Content-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50" in labelled.text[:300]
    assert jpeg[0] in labelled.content
    missing = httpx.get(f"{held.node.url}/dicomweb/studies/{held.study_a}/series/{held.native_series}/instances/"
                        f"{sop}/frames/2", headers=VIEWER)
    assert missing.status_code == 400 and "1 frame" in missing.json()["detail"]


def test_stow_retrieve_urls_answer(held: Held) -> None:
    assert len(held.retrieve_urls) == 5 and all(url.startswith(f"{PUBLIC}/dicomweb/") for url in held.retrieve_urls)
    answer = httpx.get(held.retrieve_urls[0].replace(PUBLIC, held.node.url), headers=VIEWER)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("multipart/related")
    assert held.native[0].encode() in answer.content


# -- refusals -------------------------------------------------------------------------------------


def test_unknown_bad_and_gone(held: Held) -> None:
    base = f"{held.node.url}/dicomweb"
    assert httpx.get(f"{base}/studies/{generate_uid()}/metadata", headers=VIEWER).status_code == 404
    assert httpx.get(f"{base}/studies/1.2.x/series", headers=VIEWER).status_code == 400
    assert httpx.get(f"{base}/studies", params={"StudyDate": "2026-12-01"}, headers=VIEWER).status_code == 400
    assert httpx.get(f"{base}/studies", params={"limit": "-1"}, headers=VIEWER).status_code == 400
    gone = stored_file(held, held.native[2])
    kept = gone.read_bytes()
    gone.unlink()
    try:
        url = f"{base}/studies/{held.study_a}/series/{held.native_series}/instances/{held.native[2]}"
        assert httpx.get(url, headers=VIEWER).status_code == 404
        assert len(held.client.retrieve_series(held.study_a, held.native_series)) == 2
    finally:
        gone.write_bytes(kept)


@pytest.mark.parametrize(("headers", "status"), [({}, 401), (SENDER, 403)], ids=["no-token", "sender"])
def test_reads_need_a_viewer(held: Held, headers: dict[str, str], status: int) -> None:
    for path in ("/studies", f"/studies/{held.study_a}/series/{held.native_series}/instances/{held.native[0]}"):
        assert httpx.get(f"{held.node.url}/dicomweb{path}", headers=headers).status_code == status
    sender = DICOMwebClient(url=f"{held.node.url}/dicomweb", headers={"Authorization": f"Bearer {SENDER_TOKEN}"})
    with pytest.raises(requests.HTTPError):
        sender.search_for_studies()


def test_every_read_is_audited(held: Held) -> None:
    before = len(held.node.events(AuditEventType.QUERY.value))
    DICOMwebClient(url=f"{held.node.url}/dicomweb", headers={"Authorization": f"Bearer {VIEWER_TOKEN}"}) \
        .search_for_series(held.study_b)
    events = held.node.events(AuditEventType.QUERY.value)[before:]
    assert [(e.actor, e.study_uid) for e in events] == [("api:it-desk", held.study_b)]
    assert f"/dicomweb/studies/{held.study_b}/series" in events[0].detail
