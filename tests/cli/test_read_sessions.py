"""Reads never block writes on SQLite: a long read (``audit verify``, a dashboard verify, a
slow query) runs in a deferred, read-only transaction beside the daemon's writers.

The daemon's tests run it as users do: `gastrolens serve` in a subprocess, DCMTK storescu
as the PACS, and the reader holding its transaction open while the images come in.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent
from gastrolens.errors import DatabaseError
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame
from support import basic_config, start_daemon, storescu, write_config

IMAGES = 50
STORE_SUCCESS = re.compile(r"Received Store Response \(Success\)")


def _images(folder: Path, count: int) -> list[Path]:
    frame, _ = endoscopy_frame(64, 80, None, seed=3)
    study = generate_uid()
    paths = []
    for number in range(1, count + 1):
        path = folder / f"img{number:03d}.dcm"
        as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=study, instance_number=number).save_as(
            path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_storescu_gets_success_for_every_image_while_a_long_read_is_open(tmp_path: Path, tiny_model: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gastrolens.db'}"
    config = write_config(tmp_path / "gastrolens.toml",
                          basic_config(tmp_path, url, f'[model]\npackage = "{tiny_model}"\n'))
    (tmp_path / "images").mkdir()
    images = _images(tmp_path / "images", IMAGES)
    daemon = start_daemon(config)
    reader = Database(url)
    try:
        with reader.read_session() as session:
            chain = audit.verify_chain(session)  # what `gastrolens audit verify` does, paused half way
            assert chain.intact and chain.rows >= 1
            # -td: a C-STORE answer that does not come within 15 s (the writer waits for a lock
            # this reader holds) aborts the association, so the old behaviour fails in seconds.
            sent = storescu(daemon.port, *images, extra=("-v", "-td", "15"))
            still_reading = session.scalar(select(func.count()).select_from(AuditEvent))
        assert still_reading == chain.rows  # one snapshot: the reader was inside its transaction throughout
        successes = len(STORE_SUCCESS.findall(sent.stdout + sent.stderr))
        assert (sent.returncode, successes) == (0, IMAGES), sent.stdout + sent.stderr + daemon.log
        with reader.read_session() as session:
            received = session.scalar(select(func.count()).select_from(AuditEvent)
                                      .where(AuditEvent.event_type == AuditEventType.INSTANCE_RECEIVED))
        assert received == IMAGES
    finally:
        reader.dispose()
        daemon.stop(signal.SIGKILL) if daemon.process.poll() is None else daemon.stop()


def test_a_write_commits_while_a_read_session_is_open(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'gastrolens.db'}")
    db.upgrade()
    other = Database(db.url)  # another process's engine: its own connections
    committed = threading.Event()

    def write() -> None:
        with other.session() as session:
            audit.record(session, audit.Event(type=AuditEventType.QUERY, actor="writer"))
        committed.set()

    try:
        with db.read_session() as session:
            assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0
            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            assert committed.wait(timeout=10), "the writer waited for the reader's lock"
            assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0  # its snapshot
        with db.read_session() as session:
            assert session.scalar(select(func.count()).select_from(AuditEvent)) == 1
    finally:
        db.dispose()
        other.dispose()


def test_writing_in_a_read_session_fails(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    try:
        with pytest.raises(DatabaseError, match="(?i)read.?only"), db.read_session() as session:
            audit.record(session, audit.Event(type=AuditEventType.QUERY, actor="reader"))
        with db.session() as session:  # the pooled connection is a writer's again
            audit.record(session, audit.Event(type=AuditEventType.QUERY, actor="writer"))
        with db.read_session() as session:
            assert session.scalars(select(AuditEvent.actor)).all() == ["writer"]
    finally:
        db.dispose()
