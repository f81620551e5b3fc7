"""Retention: remove stored inputs and outputs older than ``retention.days``.

Nothing undelivered is removed: an instance's file goes only when every output made
from it was sent everywhere, an output's file only when it was sent everywhere. Rows
stay (with ``removed_at``) so the audit trail and results keep their meaning.

The database is the truth about which files exist, so a pass commits first and deletes
after: each bounded chunk of rows is marked removed (and audited) in one short
transaction, and only then are its files deleted. A crash between the two leaves files
that no live row refers to, never a row that points at a missing file; the orphan sweep
at the end of every pass removes such files once they are older than the retention age
(the age also spares a file the receiver wrote a moment before its row commits).

Many workers share one database and storage root: one pass runs at a time, in whichever
worker takes the node-wide ``retention`` lock (:func:`gastrolens.db.locks.exclusive`); the
others skip that pass. Without it two passes would both retire (and audit) the same rows
and both sweep the same orphaned files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import exists, select, union_all
from sqlalchemy.orm import Session

from gastrolens.config import Settings
from gastrolens.db import Database, audit
from gastrolens.db.locks import exclusive
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState, Outcome
from gastrolens.db.tables import Delivery, Instance, Output, utcnow
from gastrolens.storage.store import INSTANCES, OUTPUTS, Store

log = logging.getLogger(__name__)

CHUNK = 500
"""Rows retired per transaction: the write lock is held for one chunk, not for the whole pass."""

SWEPT_FOLDERS = (INSTANCES, OUTPUTS)
"""Folders under the storage root whose files belong to instance and output rows (quarantine does not).
Hidden folders below them (the receiver's ``instances/.incoming`` staging area) are the store's own and
are left alone."""


class RetentionStep:
    def __init__(self, settings: Settings, db: Database, store: Store, worker: str, *, chunk: int = CHUNK) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker = worker
        self.chunk = chunk

    def run_once(self, now: datetime | None = None) -> int:
        """One pass at ``now`` (default: the clock): retire due rows, then sweep orphaned files.

        Returns how many removals were audited (rows retired plus orphaned files removed).
        """
        if not self.settings.retention.enabled:
            return 0
        with exclusive(self.db, "retention") as mine:
            if not mine:
                log.info("retention: another worker is running a pass; skipping this one")
                return 0
            return self._pass(utcnow() if now is None else _as_utc(now))

    def _pass(self, at: datetime) -> int:
        cutoff = at - timedelta(days=self.settings.retention.days)
        retired = 0
        while True:
            paths = self._retire_chunk(cutoff, at)
            for path in paths:
                self.store.remove(path)
            retired += len(paths)
            if len(paths) < self.chunk:
                break
        swept = self._sweep_orphans(cutoff)
        if retired or swept:
            log.info("retention removed %d file(s) older than %d days (%d left over by an earlier pass)",
                     retired + swept, self.settings.retention.days, swept)
        return retired + swept

    def _retire_chunk(self, cutoff: datetime, now: datetime) -> list[str]:
        """Mark up to ``chunk`` due rows removed and audit each, in one transaction; their paths."""
        unsent = exists().where(Delivery.output_id == Output.id, Delivery.state != DeliveryState.SENT)
        outputs = (select(Output).where(Output.created_at < cutoff, Output.removed_at.is_(None), ~unsent)
                   .order_by(Output.id).limit(self.chunk))
        instance_unsent = exists().where(Output.instance_id == Instance.id,
                                         exists().where(Delivery.output_id == Output.id,
                                                        Delivery.state != DeliveryState.SENT))
        instances = (select(Instance).where(Instance.received_at < cutoff, Instance.removed_at.is_(None),
                                            Instance.state.in_((InstanceState.DONE, InstanceState.FAILED)),
                                            ~instance_unsent)
                     .order_by(Instance.id).limit(self.chunk))
        paths: list[str] = []
        with self.db.session() as session:
            rows: list[Output | Instance] = list(session.scalars(outputs))
            if len(rows) < self.chunk:
                rows += list(session.scalars(instances.limit(self.chunk - len(rows))))
            for row in rows:
                row.removed_at = now
                kind = "output" if isinstance(row, Output) else "instance"
                audit.record(session, audit.Event(
                    type=AuditEventType.RETENTION_REMOVED, actor=self.worker, outcome=Outcome.SUCCESS,
                    sop_uid=row.sop_instance_uid,
                    detail={"kind": kind, "id": row.id, "path": row.file_path,
                            "file_existed": self.store.absolute(row.file_path).exists(),
                            "retention_days": self.settings.retention.days}))
                paths.append(row.file_path)
        return paths

    def _sweep_orphans(self, cutoff: datetime) -> int:
        """Remove files older than ``cutoff`` that no live instance or output row refers to."""
        swept = 0
        for batch in _batches(self._old_files(cutoff), self.chunk):
            with self.db.read_session() as session:
                live = _live_paths(session, batch)
            orphans = [path for path in batch if path not in live]
            if not orphans:
                continue
            with self.db.session() as session:
                for path in orphans:
                    audit.record(session, audit.Event(
                        type=AuditEventType.RETENTION_REMOVED, actor=self.worker, outcome=Outcome.SUCCESS,
                        detail={"kind": "unreferenced", "path": path, "file_existed": True,
                                "retention_days": self.settings.retention.days}))
            for path in orphans:
                self.store.remove(path)
            swept += len(orphans)
        return swept

    def _old_files(self, cutoff: datetime) -> Iterator[str]:
        limit = cutoff.timestamp()
        for folder in SWEPT_FOLDERS:
            for directory, folders, names in os.walk(self.store.root / folder):
                folders[:] = [f for f in folders if not f.startswith(".")]
                for name in names:
                    path = Path(directory) / name
                    try:
                        modified = path.stat().st_mtime
                    except FileNotFoundError:  # removed meanwhile
                        continue
                    if modified < limit:
                        yield path.relative_to(self.store.root).as_posix()


def _live_paths(session: Session, paths: Sequence[str]) -> set[str]:
    query = union_all(
        select(Instance.file_path).where(Instance.file_path.in_(paths), Instance.removed_at.is_(None)),
        select(Output.file_path).where(Output.file_path.in_(paths), Output.removed_at.is_(None)),
    )
    return set(session.scalars(query))


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _as_utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)
