"""STOW-RS receiving: the API under uvicorn on a real socket, the C-STORE ingest behind it.

What C-STORE promises holds here too: what the answer lists as stored is fsync'd, renamed
into place, and its row and audit event are committed; what fails is quarantined with its
reason and listed with the failure reason a C-STORE peer would get.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pytest
from pydicom.uid import generate_uid

from gastrolens.config.schema import DaemonSettings, DicomSettings, ServiceRole
from gastrolens.db.states import AuditEventType, InstanceState, Outcome
from support import postgres_schema

from .stow_node import (
    AUDITOR,
    DICOM,
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    MAX_BODY,
    MAX_PARTS,
    REFERENCED_SOP_SEQUENCE,
    SENDER,
    SENDER_ACTOR,
    SOP_CLASS,
    SOP_INSTANCE,
    VIEWER,
    StowNode,
    detail,
    instance,
    multipart,
    part10,
    sequence,
    sha256,
    stow_node,
    stow_settings,
    value,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StowNode]:
    folder = tmp_path_factory.mktemp("stow")
    if request.param == "sqlite":
        with stow_node(f"sqlite:///{folder / 'gastrolens.db'}", folder / "storage") as made:
            yield made
    else:
        with postgres_schema() as url, stow_node(url, folder / "storage") as made:
            yield made


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """(inode, path) of every file and folder fsync'd while the test runs (the server runs in this process)."""
    seen: list[tuple[int, str]] = []
    real = os.fsync

    def recording(fd: int) -> None:
        real(fd)
        seen.append((os.fstat(fd).st_ino, os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def test_instances_of_two_studies_are_stored_durably_recorded_and_audited(
        node: StowNode, fsynced: list[tuple[int, str]]) -> None:
    study_a, study_b = generate_uid(), generate_uid()
    series_a = generate_uid()
    sent = [instance(study_a, series_uid=series_a, number=n, seed=n) for n in (1, 2, 3)]
    sent += [instance(study_b, number=n, seed=10 + n, jpeg_quality=90) for n in (1, 2)]
    data = [part10(ds) for ds in sent]

    answer = node.post(data)

    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    assert sequence(answer, FAILED_SOP_SEQUENCE) == []
    referenced = sequence(answer, REFERENCED_SOP_SEQUENCE)
    assert [value(item, SOP_INSTANCE) for item in referenced] == [ds.SOPInstanceUID for ds in sent]
    assert [value(item, SOP_CLASS) for item in referenced] == [ds.SOPClassUID for ds in sent]
    assert [value(item, "00081190") for item in referenced] == [
        f"{node.url}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        for ds in sent], "WADO-RS Retrieve URLs, from the request's Host (no [api] public_url)"

    rows = {row.sop_instance_uid: row for row in node.instances()}
    fsynced_inodes = {inode for inode, _ in fsynced}
    fsynced_paths = {path for _, path in fsynced}
    for ds, sent_bytes in zip(sent, data, strict=True):
        row = rows[ds.SOPInstanceUID]
        assert row.state is InstanceState.RECEIVED and row.calling_ae == "STOW-RS"
        assert row.peer_address == "127.0.0.1" and row.sha256 == sha256(sent_bytes)
        stored = node.store.absolute(row.file_path)
        assert stored.read_bytes() == sent_bytes
        assert row.file_path == f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert stored.stat().st_ino in fsynced_inodes, "the file's data was fsync'd before the rename"
        assert str(stored.parent) in fsynced_paths, "the rename was made durable (folder fsync)"
    received = {e.sop_uid: e for e in node.events(AuditEventType.INSTANCE_RECEIVED.value)}
    for ds in sent:
        event = received[ds.SOPInstanceUID]
        assert event.actor == SENDER_ACTOR and event.study_uid == ds.StudyInstanceUID
        assert detail(event)["path"] == rows[ds.SOPInstanceUID].file_path


def test_resent_instances_follow_the_duplicate_and_version_rules(node: StowNode) -> None:
    study = generate_uid()
    original = instance(study, seed=1)
    assert node.post([part10(original)]).status_code == 200
    changed = instance(study, seed=2)
    changed.SOPInstanceUID = changed.file_meta.MediaStorageSOPInstanceUID = original.SOPInstanceUID
    changed.SeriesInstanceUID = original.SeriesInstanceUID

    answer = node.post([part10(original), part10(changed)])

    assert answer.status_code == 200
    assert len(sequence(answer, REFERENCED_SOP_SEQUENCE)) == 2
    uid = original.SOPInstanceUID
    assert sorted((r.version, r.superseded) for r in node.instances() if r.sop_instance_uid == uid) == [
        (1, True), (2, False)]
    duplicate = [e for e in node.events(AuditEventType.INSTANCE_DUPLICATE.value) if e.sop_uid == uid]
    assert len(duplicate) == 1 and duplicate[0].actor == SENDER_ACTOR
    assert [e.sop_uid for e in node.events(AuditEventType.INSTANCE_NEW_VERSION.value)].count(uid) == 1


def test_one_uid_sent_twice_in_one_request_is_versioned_in_the_order_sent(node: StowNode) -> None:
    study = generate_uid()
    first, second = instance(study, seed=31), instance(study, seed=32)
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    second.SeriesInstanceUID = first.SeriesInstanceUID
    others = [part10(instance(study, seed=40 + n)) for n in range(4)]  # many parts: the parallel path's size

    answer = node.post([*others[:2], part10(first), *others[2:], part10(second)])

    assert answer.status_code == 200
    rows = sorted((r.version, r.superseded, r.sha256) for r in node.instances()
                  if r.sop_instance_uid == first.SOPInstanceUID)
    assert rows == [(1, True, sha256(part10(first))), (2, False, sha256(part10(second)))]


def test_bad_parts_are_quarantined_with_their_reason_and_the_rest_is_stored(node: StowNode) -> None:
    study = generate_uid()
    good = instance(study)
    no_sop_uid = instance(study, seed=3)
    del no_sop_uid.SOPInstanceUID
    ct = instance(study, seed=4)
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    before = node.count()

    answer = node.post([b"this is not DICOM", part10(good), part10(no_sop_uid), part10(ct)])

    assert answer.status_code == 202, answer.text
    assert [value(i, SOP_INSTANCE) for i in sequence(answer, REFERENCED_SOP_SEQUENCE)] == [good.SOPInstanceUID]
    failed = sequence(answer, FAILED_SOP_SEQUENCE)
    assert [value(item, FAILURE_REASON) for item in failed] == [0xC000, 0xA900, 0x0122]
    assert value(failed[0], SOP_INSTANCE) is None and value(failed[2], SOP_INSTANCE) == ct.SOPInstanceUID
    assert value(failed[2], SOP_CLASS) == CT_IMAGE_STORAGE
    assert node.count() == (before[0] + 1, before[1] + 3)
    quarantined = node.quarantined()[-3:]
    assert [q.status for q in quarantined] == [0xC000, 0xA900, 0x0122]
    assert "does not parse" in quarantined[0].reason
    assert quarantined[1].reason == "missing SOPInstanceUID"
    assert "accepted_sop_classes" in quarantined[2].reason
    assert all(q.calling_ae == "STOW-RS" for q in quarantined)
    note = node.store.absolute(quarantined[0].file_path[: -len(".dcm")] + ".json").read_text()
    assert '"reason": "the data set does not parse' in note
    assert node.store.absolute(quarantined[0].file_path).read_bytes() == b"this is not DICOM"
    events = node.events(AuditEventType.INSTANCE_QUARANTINED.value)[-3:]
    assert {e.actor for e in events} == {SENDER_ACTOR}
    assert [detail(e)["status"] for e in events] == ["0xC000", "0xA900", "0x0122"]


def test_an_instance_of_another_study_than_addressed_fails(node: StowNode) -> None:
    addressed, other = generate_uid(), generate_uid()
    mine, stray = instance(addressed), instance(other)

    answer = node.post([part10(mine), part10(stray)], study=addressed)

    assert answer.status_code == 202
    assert [value(i, SOP_INSTANCE) for i in sequence(answer, REFERENCED_SOP_SEQUENCE)] == [mine.SOPInstanceUID]
    failed = sequence(answer, FAILED_SOP_SEQUENCE)
    assert [(value(i, SOP_INSTANCE), value(i, FAILURE_REASON)) for i in failed] == [(stray.SOPInstanceUID, 0xA900)]
    assert stray.SOPInstanceUID not in {r.sop_instance_uid for r in node.instances()}
    assert answer.json()["00081190"]["Value"] == [f"{node.url}/dicomweb/studies/{addressed}"]
    quarantine = node.quarantined()[-1]
    assert quarantine.sop_instance_uid == stray.SOPInstanceUID and addressed in quarantine.reason
    assert other in quarantine.reason


def test_all_failed_is_409(node: StowNode) -> None:
    addressed = generate_uid()
    answer = node.post([part10(instance(generate_uid())), b"\0" * 200], study=addressed)
    assert answer.status_code == 409
    assert sequence(answer, REFERENCED_SOP_SEQUENCE) == []
    assert [value(i, FAILURE_REASON) for i in sequence(answer, FAILED_SOP_SEQUENCE)] == [0xA900, 0xC000]


def test_xml_when_the_client_asks_for_it(node: StowNode) -> None:
    ds = instance(generate_uid())
    answer = node.post([part10(ds)], headers={**SENDER, "Accept": "application/dicom+xml"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom+xml"
    root = ElementTree.fromstring(answer.content)
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    assert root.tag == "{http://dicom.nema.org/PS3.19/models/NativeDICOM}NativeDicomModel"
    uid = root.find("d:DicomAttribute[@tag='00081199']/d:Item/d:DicomAttribute[@tag='00081155']/d:Value", ns)
    assert uid is not None and uid.text == ds.SOPInstanceUID


# -- refused whole: nothing stored ----------------------------------------------------------


def test_a_body_over_the_limit_is_413_and_nothing_is_stored(node: StowNode) -> None:
    small = part10(instance(generate_uid()))
    big = part10(instance(generate_uid(), size=(600, 800), seed=5))  # 1.4 MB uncompressed
    assert len(small) + len(big) < MAX_BODY < len(small) + 2 * len(big)
    before = node.count()

    declared = node.post([small, big, big])
    body, boundary = multipart([small, big, big])
    chunked = httpx.post(f"{node.url}/dicomweb/studies",
                         headers={**SENDER, "Content-Type": f"{DICOM}; boundary={boundary}"},
                         content=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]), timeout=60)

    for answer in (declared, chunked):
        assert answer.status_code == 413
        assert "api.stow_max_body_bytes" in answer.json()["detail"]
    assert "content-length" not in chunked.request.headers, "the second request streamed without a declared length"
    assert node.count() == before
    refused = node.events(AuditEventType.STORE_REFUSED.value)[-2:]
    assert [detail(e)["http_status"] for e in refused] == [413, 413] and {e.actor for e in refused} == {SENDER_ACTOR}
    assert refused[0].outcome is Outcome.FAILURE
    assert node.post([small, big]).status_code == 200, "under the limit is fine"


def test_more_parts_than_allowed_is_413_and_nothing_is_stored(node: StowNode) -> None:
    study = generate_uid()
    before = node.count()
    answer = node.post([part10(instance(study, number=n, seed=n)) for n in range(MAX_PARTS + 1)])
    assert answer.status_code == 413 and "api.stow_max_parts" in answer.json()["detail"]
    assert node.count() == before


@pytest.mark.parametrize(("content_type", "status"), [
    ("application/dicom", 415),
    ('multipart/related; type="application/dicom+json"; boundary=b', 415),
    ("multipart/form-data; boundary=b", 415),
    ('multipart/related; type="application/dicom"', 400),
])
def test_a_body_that_is_not_dicom_multipart_is_refused(node: StowNode, content_type: str, status: int) -> None:
    before = node.count()
    answer = node.post([part10(instance(generate_uid()))], content_type=content_type)
    assert answer.status_code == status and answer.json()["detail"]
    assert node.count() == before


def test_a_truncated_or_empty_body_is_400(node: StowNode) -> None:
    body, boundary = multipart([part10(instance(generate_uid()))])
    headers = {**SENDER, "Content-Type": f"{DICOM}; boundary={boundary}"}
    before = node.count()
    for content in (body[: len(body) // 2], f"--{boundary}--\r\n".encode(), b"no multipart here"):
        answer = httpx.post(f"{node.url}/dicomweb/studies", content=content, headers=headers, timeout=30)
        assert answer.status_code == 400, content[:40]
    assert node.count() == before


def test_a_study_path_that_is_no_uid_is_400(node: StowNode) -> None:
    answer = node.post([part10(instance(generate_uid()))], study="1.2.abc")
    assert answer.status_code == 400 and "study" in answer.json()["detail"]


# -- who may store --------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer not-a-token"}, 401),
    (VIEWER, 403),
    (AUDITOR, 403),
], ids=["no-token", "unknown-token", "viewer", "auditor"])
def test_only_a_sender_may_store(node: StowNode, headers: dict[str, str], status: int) -> None:
    before = node.count()
    answer = node.post([part10(instance(generate_uid()))], headers=headers)
    assert answer.status_code == status, answer.text
    assert node.count() == before


def test_a_sender_reads_nothing(node: StowNode) -> None:
    assert httpx.get(f"{node.url}/api/studies", headers=SENDER).status_code == 403
    assert httpx.get(f"{node.url}/api/audit", headers=SENDER).status_code == 403


def test_without_an_ingest_stow_is_503(node: StowNode, tmp_path: Path) -> None:
    from gastrolens.api.server import ApiServer

    server = ApiServer(node.settings, node.db, store_root=tmp_path)
    server.start()
    try:
        body, boundary = multipart([part10(instance(generate_uid()))])
        answer = httpx.post(f"{server.url}/dicomweb/studies", content=body,
                            headers={**SENDER, "Content-Type": f"{DICOM}; boundary={boundary}"})
        assert answer.status_code == 503
    finally:
        server.stop()


def test_a_part_without_preamble_is_stored_as_a_part10_file(node: StowNode) -> None:
    ds = instance(generate_uid())
    bare = part10(ds)[132:]  # File Meta Information first, as dicomweb-client sends it
    assert bare[:2] == b"\x02\x00"

    answer = node.post([bare])

    assert answer.status_code == 200, answer.text
    row = next(r for r in node.instances() if r.sop_instance_uid == ds.SOPInstanceUID)
    assert node.store.absolute(row.file_path).read_bytes() == bytes(128) + b"DICM" + bare


def test_no_room_on_disk_fails_every_part_with_0xA700(tmp_path: Path) -> None:
    with stow_node(f"sqlite:///{tmp_path / 'gastrolens.db'}", tmp_path / "storage", min_free_mb=2**40) as full:
        answer = full.post([part10(instance(generate_uid())), part10(instance(generate_uid(), seed=1))])
        assert answer.status_code == 409
        assert [value(i, FAILURE_REASON) for i in sequence(answer, FAILED_SOP_SEQUENCE)] == [0xA700, 0xA700]
        assert full.count() == (0, 0)
        refused = full.events(AuditEventType.STORE_REFUSED.value)
        assert len(refused) == 2 and detail(refused[0])["reason"] == "storage below min_free_mb"


def test_a_client_that_goes_away_mid_body_stores_nothing(node: StowNode) -> None:
    body, boundary = multipart([part10(instance(generate_uid())), part10(instance(generate_uid(), seed=1))])
    before, refusals = node.count(), len(node.events(AuditEventType.STORE_REFUSED.value))
    host, port = node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}\r\nAuthorization: {SENDER['Authorization']}"
                      f"\r\nContent-Type: {DICOM}; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
                     .encode() + body[: len(body) // 2])
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while len(node.events(AuditEventType.STORE_REFUSED.value)) == refusals and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = node.events(AuditEventType.STORE_REFUSED.value)[refusals:]
    assert [detail(e)["reason"] for e in refused] == ["the client went away before the body ended"]
    assert node.count() == before


def test_gastrolens_api_token_makes_a_sender(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    from gastrolens.api.auth import Role, TokenRegistry
    from gastrolens.cli import main
    from gastrolens.config.schema import APIToken

    assert main(["api", "token", "endo-gateway", "--role", "sender"]) == 0
    out = capsys.readouterr().out
    token = out.split("\n\n")[1].strip()
    table = tomllib.loads(out[out.index("[[api.tokens]]"):])["api"]["tokens"][0]
    principal = TokenRegistry([APIToken(**table)]).identify(token)
    assert principal is not None and principal.role is Role.SENDER
    assert not principal.role.grants(Role.VIEWER) and not Role.AUDITOR.grants(Role.SENDER)


@pytest.mark.parametrize(("role", "processes", "stores"), [
    ("all", 1, "its C-STORE ingest"), ("receiver", 2, "an ingest of its own"), ("worker", 1, "nothing"),
])
def test_the_service_hands_its_api_the_ingest_of_its_role(tmp_path: Path, role: str, processes: int,
                                                          stores: str) -> None:
    from gastrolens.daemon.service import Service

    settings = stow_settings(f"sqlite:///{tmp_path / 'gastrolens.db'}", tmp_path / "storage").model_copy(
        update={"daemon": DaemonSettings(role=ServiceRole(role)),
                "dicom": DicomSettings(port=0, receiver_processes=processes)})
    service = Service(settings)
    try:
        if stores == "nothing":
            assert service.stow_ingest is None
        elif stores == "its C-STORE ingest":
            assert service.stow_ingest is not None and service.stow_ingest is service.ingest
        else:
            assert service.ingest is None and service.stow_ingest is not None
            assert service.stow_ingest._write_lock is service.receiver.write_lock  # type: ignore[union-attr]
    finally:
        if service.stow_ingest is not None:
            service.stow_ingest.close()
        service.db.dispose()


def test_a_preamble_before_the_first_boundary_is_skipped(node: StowNode) -> None:
    ds = instance(generate_uid())
    body, boundary = multipart([part10(ds)])
    answer = httpx.post(f"{node.url}/dicomweb/studies", content=b"This is a multipart message (RFC 2046).\r\n" + body,
                        headers={**SENDER, "Content-Type": f"{DICOM}; boundary={boundary}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert [value(i, SOP_INSTANCE) for i in sequence(answer, REFERENCED_SOP_SEQUENCE)] == [ds.SOPInstanceUID]
