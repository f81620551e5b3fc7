"""Retention commits rows first, in bounded chunks, then deletes files; a later pass sweeps leftovers.

The invariant under test: at every moment, a row that claims a file (``removed_at`` is
null) has that file on disk. A crash may leave files without a live row; the next pass
removes them once they are older than the retention age. Time is passed in as ``now``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from gastrolens.config import Settings
from gastrolens.daemon.retention import RetentionStep
from gastrolens.db import Database
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState
from gastrolens.db.tables import AuditEvent, Delivery, Instance, Output, Series, Study, utcnow
from gastrolens.findings import OutputKind
from gastrolens.storage.store import Store

DAYS = 30
SC = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


class CrashingStore(Store):
    """A store whose process dies while deleting its ``crash_at``-th file (after the ones before it)."""

    def __init__(self, root: Path, crash_at: int) -> None:
        super().__init__(root, fsync=False)
        self.crash_at = crash_at
        self.calls = 0

    def remove(self, relative: str) -> bool:
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash
        return super().remove(relative)


@dataclass
class Node:
    db: Database
    root: Path
    settings: Settings

    def step(self, store: Store | None = None, chunk: int = 2) -> RetentionStep:
        return RetentionStep(
            self.settings, self.db, store or Store(self.root, fsync=False), "retention-test", chunk=chunk
        )

    def live_rows_with_missing_files(self) -> list[str]:
        with self.db.read_session() as s:
            live = [
                *s.scalars(select(Instance.file_path).where(Instance.removed_at.is_(None))),
                *s.scalars(select(Output.file_path).where(Output.removed_at.is_(None))),
            ]
        return [p for p in live if not (self.root / p).exists()]

    def count(self, model: type[Instance] | type[Output], *, removed: bool) -> int:
        column = model.removed_at.is_not(None) if removed else model.removed_at.is_(None)
        with self.db.read_session() as s:
            return int(s.scalar(select(func.count()).select_from(model).where(column)) or 0)

    def audited_removals(self) -> int:
        with self.db.read_session() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(AuditEvent)
                    .where(AuditEvent.event_type == AuditEventType.RETENTION_REMOVED)
                )
                or 0
            )

    def files(self) -> set[str]:
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[Node]:
    db = Database(db_url)
    db.upgrade()
    settings = Settings.model_validate(
        {
            "database": {"url": db_url},
            "retention": {"enabled": True, "days": DAYS},
            "storage": {"root": str(tmp_path / "storage"), "min_free_mb": 1},
        }
    )
    yield Node(db, tmp_path / "storage", settings)
    db.dispose()


def _fill(node: Node, images: int, delivery: DeliveryState = DeliveryState.SENT) -> None:
    """``images`` done instances of one study, each with one overlay output delivered in ``delivery``."""
    store = Store(node.root, fsync=False)
    study_uid, series_uid = generate_uid(), generate_uid()
    with node.db.session() as s:
        study = Study(study_instance_uid=study_uid)
        s.add(study)
        s.flush()
        series = Series(series_instance_uid=series_uid, study_id=study.id)
        s.add(series)
        s.flush()
        for _ in range(images):
            sop = generate_uid()
            path = store.instance_path(study_uid, series_uid, sop, 1)
            store.write(path, b"instance")
            instance = Instance(
                sop_instance_uid=sop,
                series_id=series.id,
                study_id=study.id,
                sop_class_uid=SC,
                transfer_syntax_uid=EXPLICIT_LE,
                state=InstanceState.DONE,
                file_path=path,
                sha256="0" * 64,
                size_bytes=8,
            )
            s.add(instance)
            s.flush()
            overlay = generate_uid()
            out_path = f"outputs/{study_uid}/overlay/{overlay}.dcm"
            store.write(out_path, b"overlay")
            output = Output(
                kind=OutputKind.OVERLAY,
                study_id=study.id,
                instance_id=instance.id,
                sop_instance_uid=overlay,
                series_instance_uid=generate_uid(),
                sop_class_uid=SC,
                file_path=out_path,
                model_sha256="1" * 64,
            )
            s.add(output)
            s.flush()
            s.add(Delivery(output_id=output.id, destination="pacs", state=delivery))


def _later() -> datetime:
    """A clock past the retention age of everything made now (files included, by their mtime)."""
    return utcnow() + timedelta(days=DAYS + 1)


def test_a_crash_between_commit_and_delete_leaves_only_files_a_later_pass_removes(node: Node) -> None:
    _fill(node, images=3)  # 6 due rows, 6 files
    later = _later()
    with pytest.raises(Crash):  # dies deleting the 2nd file of the first chunk of 2
        node.step(CrashingStore(node.root, crash_at=2), chunk=2).run_once(now=later)
    assert node.live_rows_with_missing_files() == []
    assert node.count(Output, removed=True) + node.count(Instance, removed=True) == 2, "one chunk committed"
    assert len(node.files()) == 5, "the first file went; the second stayed behind its retired row"
    assert node.audited_removals() == 2

    removed = node.step(chunk=2).run_once(now=later)
    assert removed == 4 + 1, "the four rows left, and the file the crash left behind"
    assert node.files() == set()
    assert node.count(Output, removed=False) + node.count(Instance, removed=False) == 0
    assert node.audited_removals() == 2 + 5
    assert node.step(chunk=2).run_once(now=later) == 0


def test_every_chunk_is_committed_before_its_files_go(node: Node) -> None:
    _fill(node, images=5)  # 10 due rows in chunks of 3
    with pytest.raises(Crash):  # dies on the first file of the third chunk
        node.step(CrashingStore(node.root, crash_at=7), chunk=3).run_once(now=_later())
    assert node.live_rows_with_missing_files() == []
    assert node.count(Output, removed=True) + node.count(Instance, removed=True) == 9
    assert len(node.files()) == 10 - 6


def test_the_sweep_spares_young_referenced_quarantined_and_staged_files(node: Node) -> None:
    _fill(node, images=1, delivery=DeliveryState.RETRYING)  # not delivered: kept however old
    stray = "outputs/1.2.3/overlay/1.2.3.4.dcm"
    (node.root / stray).parent.mkdir(parents=True)
    (node.root / stray).write_bytes(b"no row refers to this file")
    (node.root / "quarantine" / "note.dcm").write_bytes(b"kept by its own rules")
    (node.root / "instances" / ".incoming").mkdir(exist_ok=True)
    (node.root / "instances" / ".incoming" / "rx-1.part").write_bytes(b"the receiver's staging area")
    kept = node.files() - {stray}

    assert node.step().run_once(now=utcnow()) == 0, "the stray file is younger than the retention age"
    assert stray in node.files()
    assert node.step().run_once(now=_later()) == 1
    assert node.files() == kept
    assert node.live_rows_with_missing_files() == []


def test_nothing_happens_when_retention_is_off(node: Node) -> None:
    _fill(node, images=1)
    off = node.settings.model_copy(update={"retention": node.settings.retention.model_copy(update={"enabled": False})})
    assert RetentionStep(off, node.db, Store(node.root, fsync=False), "w").run_once(now=_later()) == 0
    assert len(node.files()) == 2
