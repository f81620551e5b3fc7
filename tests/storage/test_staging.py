"""Received bytes are staged (fsync'd) before the database is touched, then renamed into place."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gastrolens.errors import StorageError
from gastrolens.storage.store import INCOMING, STALE_INCOMING_SECONDS, Store


def test_stage_then_place_moves_the_bytes_under_their_final_name(tmp_path: Path):
    store = Store(tmp_path, fsync=True)
    staged = store.stage(b"DICM bytes")
    assert staged.parent == tmp_path / INCOMING and staged.read_bytes() == b"DICM bytes"
    placed = store.place(staged, "instances/1.2/1.3/1.4.dcm")
    assert placed == (tmp_path / "instances/1.2/1.3/1.4.dcm").resolve()
    assert placed.read_bytes() == b"DICM bytes" and not staged.exists()
    assert list((tmp_path / INCOMING).iterdir()) == []


def test_place_refuses_a_path_outside_the_root(tmp_path: Path):
    store = Store(tmp_path / "root", fsync=False)
    staged = store.stage(b"x")
    with pytest.raises(StorageError):
        store.place(staged, "../outside.dcm")
    store.discard(staged)
    assert not staged.exists()


def test_only_stale_staged_files_are_removed_at_start(tmp_path: Path):
    store = Store(tmp_path, fsync=False)
    old, recent = store.stage(b"old"), store.stage(b"recent")
    long_ago = time.time() - STALE_INCOMING_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    Store(tmp_path, fsync=False)  # another receiver process starting beside this one
    assert not old.exists() and recent.exists()
