"""A failed inference device stops the service with EX_TEMPFAIL, audited, so systemd starts a fresh process."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from gastrolens.config import Settings
from gastrolens.daemon.service import EXIT_DEVICE_LOST, Service
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.db.tables import AuditEvent
from gastrolens.errors import DeviceError


class _LostDevice:
    """Stands in for the inference step on a GPU whose CUDA context is poisoned."""

    def __init__(self) -> None:
        self.calls = 0

    def drain(self, should_stop: Callable[[], bool]) -> int:
        self.calls += 1
        raise DeviceError("CUDA error: an illegal memory access was encountered")

    def close(self) -> None:
        pass


def test_a_lost_device_stops_the_service_with_exit_status_75(tmp_path: Path) -> None:
    settings = Settings.model_validate({
        "dicom": {"port": 0, "receiver_processes": 1},
        "storage": {"root": str(tmp_path / "storage"), "min_free_mb": 0, "fsync": False},
        "database": {"url": f"sqlite:///{tmp_path / 'gl.db'}"},
    })
    service = Service(settings)
    service.db.upgrade()
    lost = _LostDevice()
    service.inference = lost  # type: ignore[assignment]

    service.drain_queue()  # what the scheduler's inference job runs
    assert service.stop_requested
    assert service.exit_status == EXIT_DEVICE_LOST
    assert lost.calls == 1

    service.stop()
    with service.db.read_session() as session:
        stopped = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == AuditEventType.SERVICE_STOPPED)
        ).one()
    assert stopped.outcome is Outcome.FAILURE
    detail = json.loads(stopped.detail)
    assert detail["exit_status"] == EXIT_DEVICE_LOST
    assert "illegal memory access" in detail["reason"]
