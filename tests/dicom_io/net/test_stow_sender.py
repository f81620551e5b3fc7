"""The STOW-RS sender against a real HTTP server on a loopback port: what each answer comes to."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom import dcmread

from gastrolens.config.schema import DicomWeb
from gastrolens.dicom_io.net.stow import StowObject, stow_files
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame
from gastrolens.sending import SendOutcome
from support import free_port

UID_TAG, FAILED, REFERENCED, REASON = "00081155", "00081198", "00081199", "00081197"


def item(uid: str, reason: int | None = None) -> dict:
    found = {UID_TAG: {"vr": "UI", "Value": [uid]}, "00081150": {"vr": "UI", "Value": [SECONDARY_CAPTURE]}}
    if reason is not None:
        found[REASON] = {"vr": "US", "Value": [reason]}
    return found


class Peer:
    """Answers each POST with ``status`` and ``body(uid)`` (DICOM JSON), after ``delay`` seconds."""

    def __init__(self) -> None:
        self.status = 200
        self.body = lambda uid: {REFERENCED: {"vr": "SQ", "Value": [item(uid)]}}
        self.delay = 0.0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer.requests.append((self.path, dict(self.headers), data))
                time.sleep(peer.delay)
                uid = peer.sent_uid
                payload = b"" if peer.body is None else json.dumps(peer.body(uid)).encode()
                try:
                    self.send_response(peer.status)
                    if payload:
                        self.send_header("Content-Type", "application/dicom+json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (timeout test)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.sent_uid = ""

    def destination(self, **extra: object) -> DicomWeb:
        return DicomWeb.model_validate({"kind": "dicomweb", "name": "archive",
                                        "url": f"http://127.0.0.1:{self.port}/dicom-web/", **extra})


@pytest.fixture
def peer() -> Iterator[Peer]:
    server = Peer()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def output(tmp_path: Path) -> StowObject:
    frame, _ = endoscopy_frame(16, 24, None)
    ds = as_dicom(frame, sop_class=SECONDARY_CAPTURE)
    path = tmp_path / "out.dcm"
    ds.save_as(path, enforce_file_format=True)
    return StowObject(path, str(ds.SOPInstanceUID))


def send_one(peer: Peer, output: StowObject, **extra: object):
    peer.sent_uid = output.sop_instance_uid
    (result,) = stow_files([output], peer.destination(**extra))
    return result


def test_stored_with_token_and_the_standard_media_type(peer, output):
    result = send_one(peer, output, token="s3cret")
    assert result.outcome is SendOutcome.SENT and result.status == 200
    ((path, headers, body),) = peer.requests
    assert path == "/dicom-web/studies"
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert output.sop_instance_uid.encode() in body
    assert dcmread(output.path).SOPInstanceUID == output.sop_instance_uid


def test_no_token_no_authorization_header(peer, output):
    send_one(peer, output)
    assert "Authorization" not in peer.requests[0][1]


def test_a_bare_200_is_success(peer, output):
    peer.body = None
    assert send_one(peer, output).outcome is SendOutcome.SENT


@pytest.mark.parametrize(("status", "reason"), [(200, 0xA900), (202, 0xC000), (409, 0xA700)])
def test_a_failed_sop_is_permanent_with_its_reason(peer, output, status, reason):
    peer.status = status
    peer.body = lambda uid: {FAILED: {"vr": "SQ", "Value": [item(uid, reason)]}}
    result = send_one(peer, output)
    assert result.outcome is SendOutcome.PERMANENT and result.status == reason
    assert f"0x{reason:04X}" in result.reason


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_server_errors_and_throttling_are_retried(peer, output, status):
    peer.status = status
    peer.body = None
    result = send_one(peer, output)
    assert result.outcome is SendOutcome.RETRY and result.status == status, result
    assert len(peer.requests) == 1, "dicomweb-client's own retrying is off: backoff belongs to delivery"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 415])
def test_other_client_errors_are_permanent(peer, output, status):
    peer.status = status
    peer.body = None
    result = send_one(peer, output)
    assert result.outcome is SendOutcome.PERMANENT and result.status == status and f"HTTP {status}" in result.reason


def test_an_answer_naming_other_objects_is_retried(peer, output):
    peer.body = lambda uid: {REFERENCED: {"vr": "SQ", "Value": [item("1.2.3.4.5")]}}
    assert send_one(peer, output).outcome is SendOutcome.RETRY


def test_a_timeout_is_retried(peer, output):
    peer.delay = 2.0
    result = send_one(peer, output, timeout_seconds=0.3)
    assert result.outcome is SendOutcome.RETRY and "no answer" in result.reason


def test_nobody_listening_is_retried(output):
    destination = DicomWeb(kind="dicomweb", name="archive", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    (result,) = stow_files([output], destination)
    assert result.outcome is SendOutcome.RETRY and "no answer" in result.reason


def test_a_missing_file_is_permanent(peer, tmp_path):
    result = send_one(peer, StowObject(tmp_path / "gone.dcm", "1.2.3"))
    assert result.outcome is SendOutcome.PERMANENT and "missing" in result.reason
    assert peer.requests == []


def test_each_object_is_its_own_request_and_result(peer, output, tmp_path):
    other = tmp_path / "other.dcm"
    other.write_bytes(output.path.read_bytes())
    peer.status, peer.body = 503, None
    results = list(stow_files([output, StowObject(tmp_path / "gone.dcm", "1.2.3"), output],
                              peer.destination()))
    assert [r.outcome for r in results] == [SendOutcome.RETRY, SendOutcome.PERMANENT, SendOutcome.RETRY]
    assert len(peer.requests) == 2


@pytest.mark.parametrize(("url", "reason"), [("ftp://x/dicom-web", "http(s) URL"), ("http:///x", "http(s) URL"),
                                            ("http://x/dw?a=1", "no query")])
def test_bad_urls_are_refused_in_the_configuration(url, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        DicomWeb(kind="dicomweb", name="a", url=url)


def test_an_https_ca_must_be_readable(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        DicomWeb(kind="dicomweb", name="a", url="https://pacs/dicom-web", ca=tmp_path / "none.pem")
    assert DicomWeb(kind="dicomweb", name="a", url="http://pacs/dicom-web", ca=tmp_path / "none.pem").ca


def test_a_server_that_does_not_answer_costs_one_timeout_per_round(peer, output):
    peer.delay = 2.0
    peer.sent_uid = output.sop_instance_uid
    started = time.monotonic()
    results = list(stow_files([output, output, output], peer.destination(timeout_seconds=0.3)))
    assert [r.outcome for r in results] == [SendOutcome.RETRY] * 3
    assert len(peer.requests) == 1 and time.monotonic() - started < 1.5
    assert all("not tried" in r.reason for r in results[1:])
