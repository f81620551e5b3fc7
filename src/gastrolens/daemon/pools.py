"""Spawned worker-process pools whose shutdown is bounded.

``ProcessPoolExecutor.shutdown(wait=True)`` joins every worker process, and so does
the interpreter at exit; a worker that never gets to exit (seen under load: the daemon
then outlived SIGTERM by more than a minute) would hold the daemon's stop forever, past
any service manager's grace period. Workers here hold nothing durable (decoded frames,
outputs that are written atomically and recorded by the daemon), so one that has not
exited :data:`STOP_GRACE_SECONDS` after the pool was told to stop is killed.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait as ready_among

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 10.0


class WorkerPool(ProcessPoolExecutor):
    """A spawn pool that starts all its processes at once and stops within a bounded time."""

    def __init__(self, processes: int, initializer: Callable[[], object], *, name: str) -> None:
        # spawn, not fork: the daemon holds torch's thread pools, which do not survive a fork
        before = set(multiprocessing.active_children())
        super().__init__(processes, mp_context=multiprocessing.get_context("spawn"), initializer=initializer)
        # A spawn pool starts a process per submission while none is idle: as many quick
        # submissions as processes start them all now, in this thread, not on the first batch.
        for started in [self.submit(int) for _ in range(processes)]:
            started.result()
        self.name = name
        self.workers = [p for p in multiprocessing.active_children() if p not in before]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not wait:
            super().shutdown(wait=False, cancel_futures=cancel_futures)
            return
        stopped = threading.Event()
        watchdog = threading.Thread(target=self._kill_stragglers, args=(stopped,), name=f"{self.name}-pool-stop",
                                    daemon=True)
        watchdog.start()
        try:
            super().shutdown(wait=True, cancel_futures=cancel_futures)
        finally:
            stopped.set()
            watchdog.join()

    def _kill_stragglers(self, stopped: threading.Event) -> None:
        """Kill the workers still running :data:`STOP_GRACE_SECONDS` after the stop began.

        Waits on the processes' sentinels, not join(): the pool's own thread reaps them.
        """
        running = {process.sentinel: process for process in self.workers}
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while running and not stopped.is_set() and (left := deadline - time.monotonic()) > 0:
            for sentinel in ready_among(list(running), timeout=min(left, 0.5)):
                running.pop(sentinel)  # type: ignore[arg-type]
        if stopped.is_set():
            return
        for process in running.values():
            log.warning("%s worker %s did not exit within %.0f s of the stop: killing it",
                        self.name, process.pid, STOP_GRACE_SECONDS)
            process.kill()
