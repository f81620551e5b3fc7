"""In-process pipeline stages over a real database and store, with a tiny untrained engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from gastrolens.config import Settings
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.db import Database
from gastrolens.dicom_io.net.received import IngestResult, ReceivedInstance
from gastrolens.findings import LesionClass
from gastrolens.models import Engine, untrained_package
from gastrolens.samples import as_dicom, endoscopy_frame
from gastrolens.storage.store import Store


@pytest.fixture(scope="session")
def tiny_engine() -> Engine:
    """Full architectures at 64 px inputs: fast on CPU, same code paths as the study's sizes."""
    engine = Engine(untrained_package(classifier_input_size=64, segmenter_input_size=65), device="cpu", batch_size=4)
    yield engine
    engine.close()


@dataclass
class Stage:
    settings: Settings
    db: Database
    store: Store

    def receive(self, study_uid: str, lesion: LesionClass | None = LesionClass.PU, seed: int = 0,
                data: bytes | None = None) -> str:
        """Store one synthetic instance through the receiver's own ingest; returns its SOP Instance UID."""
        if data is None:
            frame, _ = endoscopy_frame(60, 80, lesion, seed=seed)
            buffer = BytesIO()
            as_dicom(frame, study_uid=study_uid, jpeg_quality=90).save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
        ingest = DatabaseIngest(self.store, self.db, writers=1)
        try:
            received = ReceivedInstance(data=data, actor="test", calling_ae="TEST", peer_address="127.0.0.1",
                                        negotiated_sop_class=None, requested_sop_uid=None)
            outcome = ingest.ingest(received)
        finally:
            ingest.close()
        assert outcome.result in (IngestResult.STORED, IngestResult.DUPLICATE), outcome
        return str(dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def make_stage(db_url: str, tmp_path: Path) -> Callable[..., Stage]:
    databases = []

    def make(**overrides: object) -> Stage:
        data = {"storage": {"root": str(tmp_path / "storage")}, "database": {"url": db_url},
                "scheduler": {"study_quiet_seconds": 0, "lease_seconds": 60, "output_processes": 0},
                "delivery": {"backoff_seconds": 0, "max_attempts": 3},
                "destinations": [{"name": "archive", "folder": str(tmp_path / "archive")}]}
        data.update(overrides)
        settings = Settings.model_validate(data)
        db = Database(db_url)
        db.upgrade()
        databases.append(db)
        return Stage(settings, db, Store(settings.storage.root, fsync=False))

    yield make
    for db in databases:
        db.dispose()


@pytest.fixture
def stage(make_stage) -> Stage:
    return make_stage()


@pytest.fixture
def study_uid() -> str:
    return generate_uid()
