"""An in-process receiver on a free port, over SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gastrolens.config.schema import DicomSettings
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.db import Database
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.storage.store import Store


@dataclass
class RunningReceiver:
    receiver: Receiver
    db: Database
    store: Store
    ingest: DatabaseIngest

    @property
    def port(self) -> int:
        return self.receiver.port


@pytest.fixture
def make_receiver(db_url: str, tmp_path: Path) -> Iterator[Callable[..., RunningReceiver]]:
    started: list[RunningReceiver] = []

    def make(min_free_mb: int = 0, upgrade: bool = True, **dicom: object) -> RunningReceiver:
        db = Database(db_url)
        if upgrade:
            db.upgrade()
        store = Store(tmp_path / "storage", fsync=True, min_free_mb=min_free_mb)
        ingest = DatabaseIngest(store, db)
        receiver = Receiver(DicomSettings(port=0, **dicom), ingest)
        receiver.start()
        running = RunningReceiver(receiver, db, store, ingest)
        started.append(running)
        return running

    yield make
    for running in started:
        running.receiver.stop(drain_seconds=5)
        running.ingest.close()
        running.db.dispose()


@pytest.fixture
def receiver(make_receiver: Callable[..., RunningReceiver]) -> RunningReceiver:
    return make_receiver()
