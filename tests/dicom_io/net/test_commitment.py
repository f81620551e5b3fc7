"""Storage Commitment Push Model SCP: answers over real sockets, reports on the same or a new association."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_services_support import Node, ReportInbox, make_node, report_listener, request_commitment, wait_events
from gastrolens.config.schema import KnownPeer
from gastrolens.db.states import AuditEventType, Outcome
from support import storescu

__all__ = ["make_node"]  # the fixture


def _refs(files: dict[str, Path]) -> list[tuple[str, str]]:
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in (dcmread(p) for p in files.values())]


def _stored(node: Node, files: dict[str, Path]) -> list[tuple[str, str]]:
    for path in files.values():
        assert storescu(node.port, path).returncode == 0
    return _refs(files)


def test_held_instances_are_committed_on_the_same_association(make_node, sample_files) -> None:
    node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="127.0.0.1", port=1),))
    refs = _stored(node, sample_files)
    inbox = ReportInbox()
    transaction, status = request_commitment(node.port, refs, inbox=inbox)
    assert status == 0x0000
    assert inbox.arrived.is_set(), "no N-EVENT-REPORT on the open association"
    ((event_type, info, via),) = inbox.reports
    assert (event_type, via) == (1, "same")
    assert info.TransactionUID == transaction
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence) == sorted(u for _, u in refs)
    assert "FailedSOPSequence" not in info
    assert node.events(AuditEventType.COMMITMENT_REQUESTED)[0].outcome is Outcome.SUCCESS
    reported = wait_events(node, AuditEventType.COMMITMENT_REPORTED)
    assert json.loads(reported[0].detail)["via"] == "same-association"


def test_an_instance_never_received_or_gone_from_the_store_fails(make_node, sample_files) -> None:
    node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="127.0.0.1", port=1),))
    refs = _stored(node, sample_files)
    unknown = (refs[0][0], generate_uid())
    # A row without its file is not held durably: remove one stored file behind the node's back.
    gone = next(node.store.root.rglob(f"*{refs[1][1]}*"))
    gone.unlink()
    inbox = ReportInbox()
    _, status = request_commitment(node.port, [*refs, unknown], inbox=inbox)
    assert status == 0x0000
    ((event_type, info, _),) = inbox.reports
    assert event_type == 2
    failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.FailedSOPSequence}
    assert failed == {unknown[1]: 0x0112, refs[1][1]: 0x0112}
    assert [str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence] == [refs[0][1]]
    reported = wait_events(node, AuditEventType.COMMITMENT_REPORTED)
    assert reported[0].outcome is Outcome.WARNING
    assert set(json.loads(reported[0].detail)["failed"]) == set(failed)


def test_a_wrong_sop_class_is_a_class_instance_conflict(make_node, sample_files) -> None:
    node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="127.0.0.1", port=1),))
    sop_class, sop_uid = _stored(node, sample_files)[0]
    inbox = ReportInbox()
    request_commitment(node.port, [("1.2.840.10008.5.1.4.1.1.2", sop_uid)], inbox=inbox)
    ((_, info, _),) = inbox.reports
    assert int(info.FailedSOPSequence[0].FailureReason) == 0x0119


def test_after_release_the_report_goes_to_the_configured_peer_address(make_node, sample_files) -> None:
    listener, inbox, port = report_listener("ENDO_WS1")
    try:
        node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="127.0.0.1", port=port),))
        refs = _stored(node, sample_files)
        _, status = request_commitment(node.port, refs, stay_open=False)
        assert status == 0x0000
        assert inbox.arrived.wait(15), "no N-EVENT-REPORT on a new association"
        ((event_type, info, via),) = inbox.reports
        assert (event_type, via) == (1, "GASTROLENS")
        reported = wait_events(node, AuditEventType.COMMITMENT_REPORTED)
        assert json.loads(reported[0].detail)["via"] in ("new-association", "same-association")
    finally:
        listener.shutdown()


def test_a_report_that_cannot_be_delivered_is_audited_as_failed(make_node, sample_files) -> None:
    from support import free_port

    node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="127.0.0.1", port=free_port()),))
    for service in node.receiver.services:
        if hasattr(service, "retry_seconds"):
            service.retry_seconds = 0.05
    refs = _stored(node, sample_files)
    _, status = request_commitment(node.port, refs, stay_open=False)
    assert status == 0x0000
    reported = wait_events(node, AuditEventType.COMMITMENT_REPORTED)
    assert reported[0].outcome is Outcome.FAILURE
    assert json.loads(reported[0].detail)["delivered"] is False


@pytest.mark.parametrize("peers", [(), (KnownPeer(ae_title="ENDO_WS1", host="h", port=1, storage_commitment=False),)])
def test_only_configured_peers_may_ask(make_node, sample_files, peers) -> None:
    node = make_node(peers=peers)
    inbox = ReportInbox()
    _, status = request_commitment(node.port, _refs(sample_files), inbox=inbox)
    assert status == 0x0124
    assert not inbox.reports
    (refused,) = node.events(AuditEventType.COMMITMENT_REQUESTED)
    assert refused.outcome is Outcome.FAILURE
    assert json.loads(refused.detail)["status"] == "0x0124"


def test_a_calling_ae_off_the_allow_list_is_rejected_like_for_c_store(make_node, sample_files) -> None:
    node = make_node(allowed_calling_aets=("PACS",), peers=(KnownPeer(ae_title="ENDO_WS1", host="h", port=1),))
    with pytest.raises(AssertionError, match="refused"):
        request_commitment(node.port, _refs(sample_files))
    assert node.events(AuditEventType.ASSOCIATION_REJECTED)


def test_an_empty_request_is_an_invalid_argument(make_node) -> None:
    node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="h", port=1),))
    _, status = request_commitment(node.port, [])
    assert status == 0x0115
    (refused,) = node.events(AuditEventType.COMMITMENT_REQUESTED)
    assert refused.outcome is Outcome.FAILURE


def test_when_nothing_can_be_checked_every_instance_fails_with_processing_failure(make_node, sample_files,
                                                                                  monkeypatch) -> None:
    from gastrolens.dicom_io.net.commitment import StorageCommitmentSCP

    node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="127.0.0.1", port=1),))
    refs = _stored(node, sample_files)
    (scp,) = [s for s in node.receiver.services if isinstance(s, StorageCommitmentSCP)]

    def broken(references: object) -> object:
        raise RuntimeError("database unreachable")

    monkeypatch.setattr(scp.book, "failures", broken)
    inbox = ReportInbox()
    request_commitment(node.port, refs, inbox=inbox)
    ((event_type, info, _),) = inbox.reports
    assert event_type == 2 and "ReferencedSOPSequence" not in info
    assert {int(i.FailureReason) for i in info.FailedSOPSequence} == {0x0110}


def test_the_report_to_a_tls_peer_goes_over_tls_with_our_client_certificate(make_node, sample_files,
                                                                             tmp_path) -> None:
    import ssl
    import subprocess

    from pynetdicom import AE, evt

    from gastrolens.config.schema import DestinationTLS
    from gastrolens.dicom_io.net.services import STORAGE_COMMITMENT_PUSH_MODEL
    from support import free_port

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out", "ca.crt",
            "-subj", "/CN=test ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, usage in (("peer", "serverAuth"), ("client", "clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (tmp_path / f"{name}.ext").write_text(
            f"basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        openssl("x509", "-req", "-days", "2", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.crt"))
    server.verify_mode = ssl.CERT_REQUIRED  # the report must come with our client certificate
    server.load_cert_chain(tmp_path / "peer.crt", tmp_path / "peer.key")
    inbox = ReportInbox()
    listener = AE(ae_title="ENDO_WS1")
    listener.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=True, scp_role=True)
    port = free_port()
    listener.start_server(("127.0.0.1", port), block=False, ssl_context=server,
                          evt_handlers=[(evt.EVT_N_EVENT_REPORT, inbox.handle)])
    try:
        tls = DestinationTLS(enabled=True, ca=tmp_path / "ca.crt", cert=tmp_path / "client.crt",
                             key=tmp_path / "client.key")
        node = make_node(peers=(KnownPeer(ae_title="ENDO_WS1", host="127.0.0.1", port=port, tls=tls),))
        refs = _stored(node, sample_files)
        _, status = request_commitment(node.port, refs, stay_open=False)
        assert status == 0x0000
        assert inbox.arrived.wait(15), "no N-EVENT-REPORT over TLS"
        assert inbox.reports[0][0] == 1
    finally:
        listener.shutdown()
