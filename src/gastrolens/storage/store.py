"""The durable file store: received instances, outputs and quarantine under one root.

Paths are built only from UIDs that passed the grammar check, so no crafted UID can
reach outside the root. Every write is atomic and, unless switched off, fsync'd.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from gastrolens.dicom_uid import is_dicom_uid
from gastrolens.errors import StorageError
from gastrolens.storage.atomic import fsync_dir, write_bytes_atomic

INSTANCES, OUTPUTS, QUARANTINE = "instances", "outputs", "quarantine"
"""The three areas under the root: received files, what GastroLens wrote, rejected bytes."""
INCOMING = f"{INSTANCES}/.incoming"
"""Received bytes are written (and fsync'd) here first, then renamed into place."""
STALE_INCOMING_SECONDS = 3600


class Store:
    """Files under ``root``; the database keeps paths relative to it."""

    def __init__(self, root: Path, *, fsync: bool = True, min_free_mb: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_bytes = min_free_mb * 1024 * 1024
        for folder in (INSTANCES, OUTPUTS, QUARANTINE, INCOMING):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._resolved_root = self.root.resolve()
        self._incoming = self.root / INCOMING
        self._remove_stale_incoming()

    def has_room(self) -> bool:
        return shutil.disk_usage(self.root).free >= self.min_free_bytes

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self._resolved_root):
            raise StorageError(f"{relative!r} points outside the storage root")
        return path

    def relative(self, path: Path) -> str:
        """The path of a file under the root as the database keeps it."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str, version: int) -> str:
        _require_uids(study_uid, series_uid, sop_uid)
        name = f"{sop_uid}.dcm" if version == 1 else f"{sop_uid}.v{version}.dcm"
        return str(PurePosixPath(INSTANCES, study_uid, series_uid, name))

    def output_folder(self, study_uid: str) -> Path:
        """Where a study's outputs are written (the file names are the writers': documents.outputs)."""
        _require_uids(study_uid)
        return self.absolute(str(PurePosixPath(OUTPUTS, study_uid)))

    def write(self, relative: str, data: bytes) -> Path:
        try:
            return write_bytes_atomic(self.absolute(relative), data, fsync=self.fsync)
        except OSError as exc:
            raise StorageError(f"cannot write {relative}: {exc.strerror or exc}") from exc

    def stage(self, data: bytes) -> Path:
        """Write ``data`` to a new file under the incoming folder, fsync'd unless switched off.

        The slow half of a durable write, done before the instance's final path (which
        needs its version, hence the database) is known; :meth:`place` finishes it.
        """
        try:
            fd, name = tempfile.mkstemp(prefix="rx-", suffix=".part", dir=self._incoming)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            raise StorageError(f"cannot write a received instance: {exc.strerror or exc}") from exc
        return Path(name)

    def place(self, staged: Path, relative: str) -> Path:
        """Rename a staged file to ``relative`` and make the rename durable (folder fsync)."""
        try:
            path = self.absolute(relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, path)
            if self.fsync:
                fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot place {relative}: {exc.strerror or exc}") from exc
        return path

    def discard(self, staged: Path) -> None:
        staged.unlink(missing_ok=True)

    def _remove_stale_incoming(self) -> None:
        """Staged files a crash left behind (never answered with success); recent ones may
        belong to a receiver process starting beside this one."""
        cutoff = time.time() - STALE_INCOMING_SECONDS
        for path in self._incoming.glob("rx-*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass

    def remove(self, relative: str) -> bool:
        """Delete a stored file; False when it was already gone."""
        try:
            self.absolute(relative).unlink()
            return True
        except FileNotFoundError:
            return False

    def quarantine(self, data: bytes, reason: str, context: dict[str, Any]) -> str:
        """Keep rejected bytes with a JSON note beside them; return the relative path."""
        now = datetime.now(timezone.utc)
        name = f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:12]}"
        relative = str(PurePosixPath(QUARANTINE, f"{now:%Y%m%d}", f"{name}.dcm"))
        self.write(relative, data)
        note = {"reason": reason, "received_at": now.isoformat(), **context}
        self.write(relative[: -len(".dcm")] + ".json", json.dumps(note, indent=2, default=str).encode())
        return relative


def _require_uids(*uids: str) -> None:
    for uid in uids:
        if not is_dicom_uid(uid):
            raise StorageError(f"{uid[:80]!r} is not a valid UID; refusing to build a path from it")
