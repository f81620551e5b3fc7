"""The JSON API against a filled database, on SQLite and on PostgreSQL, over a real socket."""

from __future__ import annotations

import json

import httpx
import pytest

from .readside import AUDITOR, EXTRA_STUDIES, VIEWER, Node, query_events


def studies(api: httpx.Client, **params: object) -> dict:
    response = api.get("/api/studies", params=params, headers=VIEWER)
    assert response.status_code == 200, response.text
    return response.json()


def test_study_list_shows_state_and_conclusion_newest_first(api: httpx.Client, node: Node) -> None:
    page = studies(api)
    f = node.filled
    assert page["total"] == f.study_count
    assert [s["study_instance_uid"] for s in page["items"][:3]] == [f.queued, f.dead, f.complete]
    by_uid = {s["study_instance_uid"]: s for s in page["items"]}
    assert by_uid[f.complete]["state"] == "complete"
    assert by_uid[f.complete]["conclusion"] == "egc_hgin"
    assert by_uid[f.complete]["findings"] == {"normal": 2, "pu": 1, "egc_hgin": 1}
    assert by_uid[f.dead]["state"] == "delivery_dead"
    assert by_uid[f.dead]["deliveries"]["dead"] == 1
    assert by_uid[f.queued]["state"] == "queued"
    assert by_uid[f.queued]["images_queued"] == 1 and by_uid[f.queued]["images_failed"] == 1
    assert by_uid[f.queued]["untrained"] is True and by_uid[f.queued]["conclusion"] is None


@pytest.mark.parametrize(("params", "expected"), [
    ({"patient_id": "PID-0001"}, ["complete"]),
    ({"accession_number": "ACC1002"}, ["dead"]),
    ({"finding": "agc"}, ["dead"]),
    ({"finding": "pu"}, ["complete"]),
    ({"state": "delivery_dead"}, ["dead"]),
    ({"state": "queued"}, ["queued"]),
    ({"date_from": "2025-03-01", "date_to": "2025-03-01"}, ["complete"]),
    ({"date_from": "2025-03-01", "date_to": "2025-03-02"}, ["dead", "complete"]),
    ({"patient_id": "PID-0001", "finding": "agc"}, []),
    ({"patient_id": "NOBODY"}, []),
])
def test_filters(api: httpx.Client, node: Node, params: dict, expected: list[str]) -> None:
    page = studies(api, **params)
    assert [s["study_instance_uid"] for s in page["items"]] == [getattr(node.filled, name) for name in expected]
    assert page["total"] == len(expected)


def test_study_without_date_matches_the_day_it_arrived(api: httpx.Client, node: Node) -> None:
    from datetime import datetime, timezone

    today = datetime.now(timezone.utc).date().isoformat()
    uids = [s["study_instance_uid"] for s in studies(api, date_from=today, date_to=today)["items"]]
    assert node.filled.queued in uids and node.filled.complete not in uids


def test_pagination_walks_every_study_once(api: httpx.Client, node: Node) -> None:
    seen, offset, pages = [], 0, 0
    while offset is not None:
        page = studies(api, limit=3, offset=offset)
        assert page["limit"] == 3 and page["total"] == node.filled.study_count
        assert len(page["items"]) <= 3
        seen += [s["study_instance_uid"] for s in page["items"]]
        offset, pages = page["next_offset"], pages + 1
    assert pages == 3
    assert len(seen) == len(set(seen)) == 3 + EXTRA_STUDIES
    past_the_end = studies(api, limit=3, offset=100)
    assert past_the_end["items"] == [] and past_the_end["next_offset"] is None


def test_study_detail_has_images_results_outputs_and_deliveries(api: httpx.Client, node: Node) -> None:
    f = node.filled
    response = api.get(f"/api/studies/{f.complete}", headers=VIEWER)
    assert response.status_code == 200
    study = response.json()
    assert study["patient_id"] == "PID-0001" and study["conclusion"] == "egc_hgin"
    assert [i["sop_instance_uid"] for i in study["instances"]] == f.images[f.complete]
    ulcer = study["instances"][2]
    (result,) = ulcer["results"]
    assert result["predicted_class"] == "pu" and result["current"] is True
    assert result["probabilities"]["pu"] == pytest.approx(0.76)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)
    assert result["lesion_present"] and result["lesion_area_fraction"] == pytest.approx(0.063)
    assert {o["kind"] for o in ulcer["outputs"]} == {"seg", "sr", "overlay"}
    assert all(d["state"] == "sent" for o in ulcer["outputs"] for d in o["deliveries"])
    (report,) = study["study_outputs"]
    assert report["kind"] == "study_sr" and report["deliveries"][0]["destination"] == "pacs"


def test_instance_detail(api: httpx.Client, node: Node) -> None:
    response = api.get(f"/api/instances/{node.filled.failed_image}", headers=VIEWER)
    assert response.status_code == 200
    instance = response.json()
    assert instance["state"] == "failed" and "DecodeError" in instance["error"]
    assert instance["study_uid"] == node.filled.queued


def test_unknown_uids_are_404_with_a_message(api: httpx.Client) -> None:
    for path in ("/api/studies/1.2.3.4.5", "/api/instances/1.2.3.4.5", "/api/overlays/1.2.3.4.5.png"):
        response = api.get(path, headers=VIEWER)
        assert response.status_code == 404, path
        assert "1.2.3.4.5" in response.json()["detail"]


def test_deliveries_show_what_is_dead(api: httpx.Client, node: Node) -> None:
    response = api.get("/api/deliveries", params={"state": "dead"}, headers=VIEWER)
    assert response.status_code == 200
    page = response.json()
    assert page["total"] == 1
    (dead,) = page["items"]
    assert dead["study_uid"] == node.filled.dead and dead["output_kind"] == "overlay"
    assert dead["attempts"] == 8 and "0xA700" in dead["last_error"]
    everything = api.get("/api/deliveries", params={"destination": "pacs", "limit": 500}, headers=VIEWER).json()
    assert everything["total"] == len(everything["items"]) > 1


def test_no_token_or_unknown_token_is_401(api: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-configured-token"}, {"Authorization": "Basic dXNlcjpwdw=="}):
        response = api.get("/api/studies", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in response.json()["detail"]


def test_audit_needs_the_auditor_role(api: httpx.Client, node: Node) -> None:
    refused = api.get("/api/audit", headers=VIEWER)
    assert refused.status_code == 403
    assert "auditor" in refused.json()["detail"]
    last = query_events(node, "api:it-desk")[-1]
    assert last.outcome.value == "failure" and json.loads(last.detail)["path"] == "/api/audit"

    response = api.get("/api/audit", params={"type": ["instance.received", "instance.new_version"], "limit": 5,
                                             "order": "asc"}, headers=AUDITOR)
    assert response.status_code == 200, response.text
    page = response.json()
    assert len(page["items"]) == 5 and page["total"] >= 12
    assert {e["event_type"] for e in page["items"]} == {"instance.received"}
    ids = [e["id"] for e in page["items"]]
    assert ids == sorted(ids)


def test_an_auditor_reads_what_a_viewer_reads(api: httpx.Client) -> None:
    assert api.get("/api/studies", headers=AUDITOR).status_code == 200


def test_every_read_is_audited_with_the_token_name(api: httpx.Client, node: Node) -> None:
    before = len(query_events(node))
    studies(api, patient_id="PID-0002", limit=7)
    api.get(f"/api/studies/{node.filled.dead}", headers=VIEWER)
    events = query_events(node)[before:]
    assert len(events) == 2
    listing, detail = events
    assert listing.actor == "api:it-desk"
    assert json.loads(listing.detail) == {"path": "/api/studies", "filter": {"patient_id": "PID-0002", "limit": 7,
                                                                            "offset": 0}, "rows": 1}
    assert detail.study_uid == node.filled.dead and json.loads(detail.detail)["rows"] == 4


def test_openapi_document_describes_the_api(api: httpx.Client) -> None:
    document = api.get("/openapi.json").json()
    for path in ("/api/studies", "/api/studies/{study_uid}", "/api/instances/{sop_uid}", "/api/deliveries",
                 "/api/audit", "/healthz", "/metrics"):
        assert path in document["paths"], path
    names = {p["name"] for p in document["paths"]["/api/studies"]["get"]["parameters"]}
    assert {"patient_id", "finding", "state", "date_from", "limit", "offset"} <= names
    assert "/login" not in document["paths"]


def test_logs_name_no_patient_unless_configured(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    from .readside import serving

    caplog.set_level("INFO", logger="gastrolens")
    with serving(node) as api:
        api.get("/api/studies", params={"patient_id": "PID-0002"}, headers=VIEWER)
        api.get("/studies", params={"patient_id": "PID-0002", "token": "a-secret-in-the-address"})
    assert "GET /api/studies 200" in caplog.text and "token=it-desk" in caplog.text
    assert "PID-0002" not in caplog.text and "a-secret-in-the-address" not in caplog.text
    caplog.clear()
    with serving(node, patient_details=True) as api:
        api.get("/api/studies", params={"patient_id": "PID-0002"}, headers=VIEWER)
    assert "GET /api/studies?patient_id=PID-0002 200" in caplog.text
