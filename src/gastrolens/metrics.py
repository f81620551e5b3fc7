"""Prometheus metrics that a process observes in itself: batches, failures, CPU per stage.

The pipeline calls :func:`observe_batch` after each inference batch and
:func:`observe_failure` for each image that failed; every stage outside the networks
runs inside :func:`stage_cpu` (or reports work done in another process with
:func:`add_stage_cpu`), so the CPU budget per image can be read from ``/metrics``.
Everything here only touches the module-level :data:`REGISTRY`, so this module imports
neither FastAPI nor the database; the whole-system counts read from the database at
scrape time live in :mod:`gastrolens.api.scrape`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram

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


class Stage(str, enum.Enum):
    """The steps an image passes through; ``infer`` is the networks, every other one is overhead."""

    RECEIVE = "receive"
    DECODE = "decode"
    INFER = "infer"
    OUTPUTS = "outputs"
    RECORD = "record"
    COMPLETE = "complete"
    DELIVER = "deliver"


STAGE_CPU_SECONDS = Counter(
    "gastrolens_stage_cpu_seconds",
    "CPU seconds (thread CPU time) this process spent per stage; "
    "worker processes' time is added when their result arrives.",
    ["stage"],
    registry=REGISTRY,
)


@contextmanager
def stage_cpu(stage: Stage) -> Iterator[None]:
    """Count the calling thread's CPU time inside the block toward ``stage``."""
    started = time.thread_time()
    try:
        yield
    finally:
        STAGE_CPU_SECONDS.labels(stage.value).inc(max(0.0, time.thread_time() - started))


def add_stage_cpu(stage: Stage, seconds: float) -> None:
    """Count CPU time measured elsewhere (an output worker process) toward ``stage``."""
    if seconds > 0:
        STAGE_CPU_SECONDS.labels(stage.value).inc(seconds)

