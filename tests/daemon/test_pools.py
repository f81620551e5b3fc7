"""A worker that never exits cannot hold the daemon's stop: the pool kills it after the grace time."""

from __future__ import annotations

import atexit
import functools
import time

import pytest

from gastrolens.daemon import pools
from gastrolens.daemon.pools import WorkerPool


def test_a_worker_stuck_at_exit_is_killed_after_the_grace_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pools, "STOP_GRACE_SECONDS", 2.0)
    # Each worker registers an exit handler that sleeps for an hour: it never exits by itself.
    pool = WorkerPool(2, functools.partial(atexit.register, time.sleep, 3600), name="test")
    assert len(pool.workers) == 2 and all(p.is_alive() for p in pool.workers)
    assert pool.submit(sum, [1, 2, 3]).result(timeout=60) == 6

    started = time.monotonic()
    pool.shutdown(wait=True)
    assert time.monotonic() - started < 20
    assert not any(p.is_alive() for p in pool.workers)


def test_workers_that_exit_are_not_killed() -> None:
    pool = WorkerPool(1, int, name="test")
    (worker,) = pool.workers
    pool.shutdown(wait=True)
    assert worker.exitcode == 0
