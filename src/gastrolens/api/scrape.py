"""The ``/metrics`` registry of an app: this process's metrics plus whole-system counts from the database.

Counts that several processes share (instances by state, queue depth, deliveries,
quarantine, throughput) are read from the database when ``/metrics`` is scraped, so
every process reports the same, whole-system figures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gastrolens.db import Database
from gastrolens.db.queries import status_counts
from gastrolens.db.queries_queue import delivery_counts
from gastrolens.errors import DatabaseError
from gastrolens.metrics import REGISTRY

log = logging.getLogger(__name__)


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time; ``gastrolens_database_up 0`` when it cannot be read."""

    def __init__(self, db: Database, destination_kinds: Mapping[str, str] | None = None) -> None:
        self.db = db
        self.destination_kinds = dict(destination_kinds or {})

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to register up front

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gastrolens_database_up", "1 when the database answered this scrape.")
        try:
            with self.db.read_session() as session:
                counts = status_counts(session)
                by_kind = delivery_counts(session, self.destination_kinds)
        except DatabaseError as exc:
            log.warning("metrics: database unavailable: %s", exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        instances = GaugeMetricFamily("gastrolens_instances", "Received instances by state.", labels=["state"])
        for state, n in counts["instances"].items():
            instances.add_metric([state], n)
        yield instances
        received = CounterMetricFamily("gastrolens_instances_received", "Instances ever received (all states).")
        received.add_metric([], sum(counts["instances"].values()))
        yield received
        yield _gauge("gastrolens_queue_depth", "Instances waiting for or in processing.", counts["queue_depth"])
        deliveries = GaugeMetricFamily("gastrolens_deliveries", "Deliveries of outputs by state.", labels=["state"])
        for state, n in counts["outputs"].items():
            deliveries.add_metric([state], n)
        yield deliveries
        kinds = GaugeMetricFamily("gastrolens_deliveries_by_kind",
                                  "Deliveries by destination kind (dicom, folder, dicomweb, hl7) and state.",
                                  labels=["kind", "state"])
        for kind in sorted({*self.destination_kinds.values(), *(k for k, _ in by_kind)}):
            for state in counts["outputs"]:
                kinds.add_metric([kind, state], by_kind.get((kind, state), 0))
        yield kinds
        quarantined = CounterMetricFamily("gastrolens_quarantined", "Received files kept in quarantine.")
        quarantined.add_metric([], counts["quarantined"])
        yield quarantined
        yield _gauge(
            "gastrolens_images_per_second",
            "Frames processed per second over the last 5 minutes, all processes.",
            round(counts["images_per_minute_last_5_min"] / 60.0, 4),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


class _ProcessCollector(Collector):
    """Re-exports :data:`REGISTRY` inside an app's registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def app_registry(db: Database, destination_kinds: Mapping[str, str] | None = None) -> CollectorRegistry:
    """A registry with this process's metrics and the database's, for one app's ``/metrics``;
    ``destination_kinds`` (name to kind) labels the deliveries by kind."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProcessCollector())
    registry.register(DatabaseCollector(db, destination_kinds))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of ``registry``."""
    return generate_latest(registry)
