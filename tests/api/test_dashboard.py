"""The dashboard over HTTP: sign-in and its cookie, pages, roles, thumbnails, no external assets."""

from __future__ import annotations

import io
import json
import re

import httpx
import pytest
from PIL import Image

from gastrolens.api.context import COOKIE
from gastrolens.api.dashboard import COOKIE_MAX_AGE

from .readside import AUDITOR_TOKEN, VIEWER, VIEWER_TOKEN, Node, query_events


def signed_in(api: httpx.Client, token: str = VIEWER_TOKEN) -> httpx.Client:
    client = httpx.Client(base_url=str(api.base_url), follow_redirects=False, timeout=30)
    response = client.post("/login", data={"token": token, "next": "/studies"})
    assert response.status_code == 303
    return client


def test_pages_without_a_token_go_to_the_login_form(sqlite_api: httpx.Client) -> None:
    response = sqlite_api.get("/studies?state=queued", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fstudies%3Fstate%3Dqueued"
    form = sqlite_api.get(response.headers["location"])
    assert form.status_code == 200 and 'name="token"' in form.text and 'value="/studies?state=queued"' in form.text


def test_login_sets_an_httponly_strict_cookie(sqlite_api: httpx.Client) -> None:
    client = httpx.Client(base_url=str(sqlite_api.base_url), follow_redirects=False, timeout=30)
    response = client.post("/login", data={"token": VIEWER_TOKEN, "next": "/queue"})
    assert response.status_code == 303 and response.headers["location"] == "/queue"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and f"Max-Age={COOKIE_MAX_AGE}" in cookie
    assert client.get("/queue").status_code == 200
    out = client.post("/logout")
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]


def test_login_refuses_unknown_tokens_and_foreign_redirects(sqlite_api: httpx.Client) -> None:
    client = httpx.Client(base_url=str(sqlite_api.base_url), follow_redirects=False, timeout=30)
    refused = client.post("/login", data={"token": "guess", "next": "/studies"})
    assert refused.status_code == 401 and "not configured" in refused.text and "set-cookie" not in refused.headers
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        response = client.post("/login", data={"token": VIEWER_TOKEN, "next": target})
        assert response.headers["location"] == "/studies"


def test_a_token_in_the_address_becomes_a_cookie_and_leaves_the_address(sqlite_api: httpx.Client) -> None:
    client = httpx.Client(base_url=str(sqlite_api.base_url), follow_redirects=False, timeout=30)
    response = client.get("/studies", params={"token": VIEWER_TOKEN, "finding": "agc"})
    assert response.status_code == 303
    assert response.headers["location"] == "/studies?finding=agc"
    assert "HttpOnly" in response.headers["set-cookie"]
    page = client.get(response.headers["location"])
    assert page.status_code == 200 and "Müller, Anna" in page.text and "Zhang" not in page.text
    wrong = httpx.get(f"{sqlite_api.base_url}/studies", params={"token": "wrong"}, follow_redirects=False)
    assert wrong.status_code == 303 and "error=unknown+token" in wrong.headers["location"]
    assert "wrong" not in wrong.headers["location"]


def test_study_list_and_page_show_conclusion_probabilities_and_overlays(
    sqlite_api: httpx.Client, sqlite_node: Node
) -> None:
    client = signed_in(sqlite_api)
    f = sqlite_node.filled
    listing = client.get("/studies")
    assert listing.status_code == 200
    assert f'href="/studies/{f.complete}"' in listing.text
    assert "early gastric cancer / HGIN" in listing.text and "delivery dead" in listing.text
    page = client.get(f"/studies/{f.dead}")
    assert page.status_code == 200
    assert "advanced gastric cancer" in page.text and "62.0%" in page.text
    assert "overlay file no longer stored" in page.text  # the removed overlay: a placeholder, not a broken image
    thumbnails = re.findall(r'<img src="(/api/overlays/[0-9.]+\.png\?size=\d+)"', page.text)
    assert len(thumbnails) == 2
    png = client.get(thumbnails[0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(png.content))
    assert picture.format == "PNG" and max(picture.size) <= 480 and picture.mode == "RGB"


def test_dashboard_reads_are_audited(sqlite_api: httpx.Client, sqlite_node: Node) -> None:
    client = signed_in(sqlite_api)
    before = len(query_events(sqlite_node))
    client.get("/studies", params={"patient_id": "PID-0002"})
    (event,) = query_events(sqlite_node)[before:]
    assert event.actor == "api:it-desk"
    assert json.loads(event.detail)["filter"]["patient_id"] == "PID-0002"


def test_bad_filters_and_unknown_studies_render_a_message(sqlite_api: httpx.Client) -> None:
    client = signed_in(sqlite_api)
    bad = client.get("/studies", params={"date_from": "soon", "patient_id": "' OR 1=1 --"})
    assert bad.status_code == 422
    assert "date_from" in bad.text and "patient_id" in bad.text and "must be an ISO date" in bad.text
    assert client.get("/studies/1.2.3.4").status_code == 404
    assert client.get("/studies/1.02").status_code == 422
    assert client.get("/queue", params={"state": "lost"}).status_code == 422
    assert client.get("/audit", follow_redirects=False).status_code == 403


def test_the_audit_view_is_for_auditors(sqlite_api: httpx.Client) -> None:
    viewer = signed_in(sqlite_api)
    refused = viewer.get("/audit")
    assert refused.status_code == 403 and "auditor" in refused.text
    assert 'href="/audit"' not in viewer.get("/studies").text
    auditor = signed_in(sqlite_api, AUDITOR_TOKEN)
    page = auditor.get("/audit", params={"type": "instance.received", "verify": "1"})
    assert page.status_code == 200
    assert "Chain intact" in page.text and "instance.received" in page.text
    assert auditor.get("/audit", params={"since": "never"}).status_code == 422


def test_pages_load_nothing_from_elsewhere(sqlite_api: httpx.Client, sqlite_node: Node) -> None:
    client = signed_in(sqlite_api, AUDITOR_TOKEN)
    for path in ("/login", "/studies", f"/studies/{sqlite_node.filled.complete}", "/queue", "/audit"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert not re.search(r'(src|href)="(https?:)?//', response.text), path
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("path", ["/studies", "/queue"])
def test_pagination_links(sqlite_api: httpx.Client, path: str) -> None:
    client = signed_in(sqlite_api)
    params = {"limit": 2, **({"state": ""} if path == "/queue" else {})}  # the queue: all deliveries, not only dead
    first = client.get(path, params=params)
    assert first.status_code == 200
    assert "offset=2" in first.text and "Next" in first.text
    second = client.get(path, params={**params, "offset": 2})
    assert "Previous" in second.text


def test_api_accepts_the_dashboard_cookie(sqlite_api: httpx.Client) -> None:
    client = signed_in(sqlite_api)
    assert client.get("/api/studies").status_code == 200
    assert client.get("/api/studies", headers=VIEWER).status_code == 200


def test_an_oversized_sign_in_form_is_refused(sqlite_api: httpx.Client) -> None:
    response = sqlite_api.post(
        "/login", content=b"token=" + b"x" * 20_000, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 413 and "set-cookie" not in response.headers
