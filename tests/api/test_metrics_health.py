"""/metrics parses as Prometheus text with the promised families; /healthz reports each component."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gastrolens import metrics
from gastrolens.api import scrape
from gastrolens.db import Database

from .readside import VIEWER, Node, serving


def families(text: str) -> dict[str, dict[tuple, float]]:
    """name -> {(sample name, sorted labels): value}"""
    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        found[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return found


def test_metrics_parse_and_count_what_the_database_holds(sqlite_node: Node) -> None:
    metrics.observe_batch(0.42, 16)
    metrics.observe_batch(1.5, 4)
    metrics.observe_failure()
    with serving(sqlite_node) as api:
        closed = api.get("/metrics")
        assert closed.status_code == 401
        response = api.get("/metrics", headers=VIEWER)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = families(response.text)
    assert found["gastrolens_database_up"][("gastrolens_database_up", ())] == 1
    instances = found["gastrolens_instances"]
    assert instances[("gastrolens_instances", (("state", "done"),))] == 12
    assert instances[("gastrolens_instances", (("state", "failed"),))] == 1
    assert instances[("gastrolens_instances", (("state", "received"),))] == 1
    assert found["gastrolens_instances_received"][("gastrolens_instances_received_total", ())] == 14
    assert found["gastrolens_queue_depth"][("gastrolens_queue_depth", ())] == 1
    deliveries = found["gastrolens_deliveries"]
    assert deliveries[("gastrolens_deliveries", (("state", "dead"),))] == 1
    assert deliveries[("gastrolens_deliveries", (("state", "retrying"),))] == 0
    assert found["gastrolens_quarantined"][("gastrolens_quarantined_total", ())] == 0
    assert found["gastrolens_images_per_second"][("gastrolens_images_per_second", ())] > 0
    batch = found["gastrolens_batch_seconds"]
    assert batch[("gastrolens_batch_seconds_count", ())] >= 2
    assert batch[("gastrolens_batch_seconds_bucket", (("le", "0.5"),))] >= 1
    assert found["gastrolens_images_processed"][("gastrolens_images_processed_total", ())] >= 20
    assert found["gastrolens_images_failed"][("gastrolens_images_failed_total", ())] >= 1


def test_metrics_can_be_opened_to_the_scraper(sqlite_node: Node) -> None:
    with serving(sqlite_node, open_metrics=True) as api:
        response = api.get("/metrics")
    assert response.status_code == 200
    assert "gastrolens_queue_depth" in families(response.text)


def test_metrics_report_a_database_that_does_not_answer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry = scrape.app_registry(Database(f"sqlite:///{tmp_path / 'missing' / 'nothing-migrated.db'}"))
    found = families(scrape.exposition(registry).decode())
    assert found["gastrolens_database_up"][("gastrolens_database_up", ())] == 0
    assert "gastrolens_batch_seconds" in found


def test_health_is_open_by_default_and_names_each_component(sqlite_node: Node) -> None:
    probe = lambda: {"scheduler": True, "model": {"ok": True, "name": "GastroLens-R34", "untrained": False}}  # noqa: E731
    with serving(sqlite_node, health_probe=probe) as api:
        response = api.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert {name: c["ok"] for name, c in body["components"].items()} == {
        "database": True, "storage": True, "scheduler": True, "model": True}
    assert body["components"]["model"]["detail"]["name"] == "GastroLens-R34"


@pytest.mark.parametrize("probe", [
    lambda: {"scheduler": False, "model": True},
    lambda: {"scheduler": True, "model": {"ok": False, "error": "weights do not match their sha256"}},
    lambda: 1 / 0,
])
def test_health_is_503_when_a_component_fails(sqlite_node: Node, probe) -> None:  # type: ignore[no-untyped-def]
    with serving(sqlite_node, health_probe=probe) as api:
        response = api.get("/healthz")
    assert response.status_code == 503
    assert response.json()["status"] == "failing"


def test_health_can_require_a_token(sqlite_node: Node) -> None:
    with serving(sqlite_node, open_health=False) as api:
        assert api.get("/healthz").status_code == 401
        assert api.get("/healthz", headers=VIEWER).status_code == 200


def test_liveness_ignores_the_database_and_storage_but_not_the_process(
    sqlite_node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database outage makes the process not ready (/healthz 503) but must not get it
    restarted (/livez 200); a dead scheduler thread does."""
    from gastrolens.api import routes_ops

    down = routes_ops.Component(ok=False, detail={"error": "the database did not answer"})
    monkeypatch.setattr(routes_ops, "_database", lambda ctx: down)
    with serving(sqlite_node, health_probe=lambda: {"role": "worker", "scheduler": True, "model": True}) as api:
        assert api.get("/healthz").status_code == 503
        live = api.get("/livez")
    assert live.status_code == 200
    assert live.json()["role"] == "worker" and "database" not in live.json()["components"]
    with serving(sqlite_node, health_probe=lambda: {"scheduler": False, "model": True}) as api:
        assert api.get("/livez").status_code == 503
