"""The scheduler: APScheduler jobs for inference, study completion, delivery and retention.

Each job runs in its own thread with ``max_instances=1`` and ``coalesce``, so a slow
batch delays the next tick instead of stacking up. ``wake_inference()`` runs the
inference job at once (the receiver calls it when a full batch is waiting).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)

RETENTION_INTERVAL_SECONDS = 3600.0


class Scheduler:
    def __init__(self) -> None:
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=timezone.utc,
        )
        self.last_run: dict[str, datetime] = {}

    def add(self, name: str, step: Callable[[], object], interval_seconds: float) -> None:
        def run() -> None:
            try:
                step()
            except Exception:  # a failing tick must not kill the job; the next tick tries again
                log.exception("scheduled job %s failed", name)
            finally:
                self.last_run[name] = datetime.now(timezone.utc)

        self._scheduler.add_job(run, "interval", seconds=interval_seconds, id=name, name=name,
                                next_run_time=datetime.now(timezone.utc))

    def wake(self, name: str) -> None:
        try:
            self._scheduler.modify_job(name, next_run_time=datetime.now(timezone.utc))
        except JobLookupError:
            pass

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
