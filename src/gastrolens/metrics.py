"""Prometheus metrics: what the pipeline observes in-process, and what the database says at scrape time.

The pipeline calls :func:`observe_batch` after each inference batch and
:func:`observe_failure` for each image that failed; both only touch the module-level
:data:`REGISTRY`, so this module imports neither FastAPI nor the database.
Counts that several processes share (instances by state, queue depth, deliveries,
quarantine, throughput) come from the database through :class:`DatabaseCollector`
when ``/metrics`` is scraped, so every process reports the same, whole-system figures.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from gastrolens.db import Database
from gastrolens.db.queries import status_counts
from gastrolens.errors import DatabaseError

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
"""This process's own metrics (batch latency, images processed, failures)."""

BATCH_SECONDS = Histogram(
    "gastrolens_batch_seconds",
    "Wall time of one inference batch: decode, infer, write outputs.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
    registry=REGISTRY,
)
IMAGES_PROCESSED = Counter(
    "gastrolens_images_processed", "Images (frames) this process ran through the networks.", registry=REGISTRY
)
IMAGES_FAILED = Counter(
    "gastrolens_images_failed", "Images this process could not process (decode, inference or output errors).",
    registry=REGISTRY,
)


def observe_batch(seconds: float, images: int) -> None:
    """Record one finished inference batch of ``images`` frames that took ``seconds``."""
    BATCH_SECONDS.observe(max(0.0, float(seconds)))
    if images > 0:
        IMAGES_PROCESSED.inc(images)


def observe_failure(images: int = 1) -> None:
    """Record ``images`` images that could not be processed."""
    if images > 0:
        IMAGES_FAILED.inc(images)


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time; ``gastrolens_database_up 0`` when it cannot be read."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to register up front

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gastrolens_database_up", "1 when the database answered this scrape.")
        try:
            with self.db.session() as session:
                counts = status_counts(session)
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
        quarantined = CounterMetricFamily("gastrolens_quarantined", "Received files kept in quarantine.")
        quarantined.add_metric([], counts["quarantined"])
        yield quarantined
        yield _gauge("gastrolens_images_per_second", "Frames processed per second over the last 5 minutes, all processes.",
                     round(counts["images_per_minute_last_5_min"] / 60.0, 4))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


class _ProcessCollector(Collector):
    """Re-exports :data:`REGISTRY` inside an app's registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def app_registry(db: Database) -> CollectorRegistry:
    """A registry with this process's metrics and the database's, for one app's ``/metrics``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ProcessCollector())
    registry.register(DatabaseCollector(db))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of ``registry``."""
    return generate_latest(registry)

