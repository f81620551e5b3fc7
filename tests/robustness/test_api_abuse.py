"""Hostile HTTP requests against the running daemon's API and dashboard: always a 4xx, never a 5xx.

No or wrong token, the wrong role, injection-looking filters, path traversal, absurd
pagination and bytes that are not UTF-8 each get a clear client error; none reaches a
query as text, none reads a file outside what the API serves, none costs a 500.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import AUDITOR_TOKEN, TALLY, VIEWER_TOKEN, Node

VIEWER = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
SQL = "' OR 1=1 --"

# (category, method, path, params, headers, expected statuses)
REQUESTS: list[tuple[str, str, str, dict[str, object] | None, dict[str, str] | None, set[int]]] = [
    ("no token", "GET", "/api/studies", None, None, {401}),
    ("no token", "GET", "/api/audit", None, None, {401}),
    ("no token", "GET", "/api/overlays/1.2.3.png", None, None, {401}),
    ("wrong token", "GET", "/api/studies", None, {"Authorization": "Bearer not-a-token"}, {401}),
    ("wrong token", "GET", "/api/studies", None, {"Authorization": "Basic dXNlcjpwYXNz"}, {401}),
    ("wrong token", "GET", "/api/studies", None, {"Authorization": "Bearer " + "A" * 20000}, {401, 431}),
    ("wrong token", "GET", "/api/studies", None, {"Authorization": "Bearer"}, {401}),
    ("wrong token", "GET", "/api/studies", None, {"Authorization": f"Bearer {VIEWER_TOKEN[:-1]}"}, {401}),
    ("wrong role", "GET", "/api/audit", None, VIEWER, {403}),
    ("injection filter", "GET", "/api/studies", {"patient_id": SQL}, VIEWER, {200, 422}),
    ("injection filter", "GET", "/api/studies", {"study_uid": SQL}, VIEWER, {422}),
    ("injection filter", "GET", "/api/studies", {"sort": "patient_id; DELETE FROM studies"}, VIEWER, {422}),
    (
        "injection filter",
        "GET",
        "/api/studies",
        {"finding": "normal' UNION SELECT hash FROM audit_events--"},
        VIEWER,
        {422},
    ),
    ("injection filter", "GET", "/api/deliveries", {"destination": SQL}, VIEWER, {200, 422}),
    ("injection filter", "GET", "/api/audit", {"actor": SQL}, AUDITOR, {200, 422}),
    ("injection filter", "GET", "/api/audit", {"order": "random()"}, AUDITOR, {422}),
    ("path traversal", "GET", "/api/overlays/..%2F..%2F..%2Fetc%2Fpasswd.png", None, VIEWER, {404, 422}),
    ("path traversal", "GET", "/api/studies/..%2F..%2Fetc%2Fpasswd", None, VIEWER, {404, 422}),
    ("path traversal", "GET", "/api/instances/%2e%2e%2f%2e%2e%2fgastrolens.toml", None, VIEWER, {404, 422}),
    ("path traversal", "GET", "/static/..%2F..%2F..%2Fpyproject.toml", None, None, {401, 403, 404}),
    ("path traversal", "GET", "/studies/..%2F..%2Fetc%2Fpasswd", None, VIEWER, {303, 307, 401, 404, 422}),
    ("absurd pagination", "GET", "/api/studies", {"limit": 10**30}, VIEWER, {422}),
    ("absurd pagination", "GET", "/api/studies", {"limit": -1}, VIEWER, {422}),
    ("absurd pagination", "GET", "/api/studies", {"offset": "1e400"}, VIEWER, {422}),
    ("absurd pagination", "GET", "/api/studies", {"offset": 2**63}, VIEWER, {422}),
    ("absurd pagination", "GET", "/api/studies", {"limit": "NaN"}, VIEWER, {422}),
    ("absurd pagination", "GET", "/api/audit", {"limit": 10**9}, AUDITOR, {422}),
    ("absurd pagination", "GET", "/api/deliveries", {"offset": -(2**63)}, VIEWER, {422}),
    ("non-UTF-8", "GET", "/api/studies?patient_id=%ff%fe%00", None, VIEWER, {200, 400, 422}),
    ("non-UTF-8", "GET", "/api/studies/%ff%fe", None, VIEWER, {400, 404, 422}),
    ("non-UTF-8", "GET", "/api/overlays/%c0%af.png", None, VIEWER, {400, 404, 422}),
    ("non-UTF-8", "POST", "/login", None, {"Content-Type": "application/x-www-form-urlencoded"}, {303, 400, 401, 422}),
]


@pytest.fixture(scope="module")
def client(node: Node) -> httpx.Client:
    with httpx.Client(base_url=node.api_url, timeout=30, follow_redirects=False) as made:
        yield made


@pytest.mark.parametrize("number", range(len(REQUESTS)), ids=[f"{r[0]}:{r[2][:40]}" for r in REQUESTS])
def test_hostile_request_gets_a_client_error(client: httpx.Client, number: int) -> None:
    category, method, path, params, headers, expected = REQUESTS[number]
    content = b"token=%ff%fe\xff\xfe&next=//evil.example" if method == "POST" else None
    response = client.request(method, path, params=params, headers=headers, content=content)
    TALLY[("api", category, str(response.status_code))] += 1
    assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:300]}"
    assert response.status_code in expected, f"{method} {path}: {response.status_code} {response.text[:300]}"
    if response.status_code in (301, 302, 303, 307, 308):
        assert not response.headers.get("location", "").startswith("//"), "open redirect"
    assert "root:x:0:0" not in response.text and "[project]" not in response.text


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/studies\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xfd\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["bytes in path", "bytes in header", "TLS hello to plain HTTP", "70 kB request line"],
)
def test_raw_bytes_get_a_client_error_or_a_close(node: Node, raw: bytes) -> None:
    address = urlsplit(node.api_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(raw)
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
    status = answer.split(b" ", 2)[1].decode("ascii", "replace") if answer.startswith(b"HTTP/") else "closed"
    TALLY[("api", "raw bytes", status)] += 1
    assert status == "closed" or status.startswith("4"), answer[:200]
    assert httpx.get(f"{node.api_url}/api/studies", headers=VIEWER, timeout=10).status_code == 200
