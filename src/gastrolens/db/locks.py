"""Node-wide locks for jobs that one process at a time should run, however many workers share the database.

Claims (``db.queue``) make the per-row jobs safe with many workers. A pass that walks the
storage root rather than claimed rows (retention's sweep of unreferenced files) needs one
runner: :func:`exclusive` gives it to whichever worker comes first and tells the others to
skip this pass. On PostgreSQL it is a session advisory lock on a connection of its own,
released when the block ends or the process dies (the server drops the session). On SQLite
(one host) it is ``flock`` on a file beside the database, released the same ways.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from gastrolens.db.engine import Database
from gastrolens.errors import DatabaseError


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for ``name`` (distinct from the audit writer's)."""
    digest = hashlib.sha256(f"gastrolens:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def exclusive(db: Database, name: str) -> Iterator[bool]:
    """Yield True when this process holds the lock ``name`` for the block, False when another does.

    Never waits: a job that finds the lock taken skips its pass (another worker is running it).
    """
    if db.engine.dialect.name == "postgresql":
        with _advisory(db, lock_key(name)) as held:
            yield held
        return
    database = db.engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield True  # a database only this process sees
        return
    with _flock(Path(f"{database}.{name}.lock")) as held:
        yield held


@contextmanager
def _advisory(db: Database, key: int) -> Iterator[bool]:
    try:
        connection = db.engine.connect()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"database error: {exc.__class__.__name__}: {exc}") from exc
    try:
        held = bool(connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        connection.commit()
        try:
            yield held
        finally:
            if held:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                connection.commit()
    finally:
        connection.close()


@contextmanager
def _flock(path: Path) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
