"""Write files so that a reader never sees half of one: temporary name, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, write: Callable[[BinaryIO], object], *, fsync: bool = True) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, then rename it into place.

    On any error the temporary file is removed and ``path`` is untouched. With ``fsync``
    the file and its folder are flushed to disk before this returns, so a rename that
    survived a crash also has its content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = True) -> Path:
    return write_atomic(path, lambda fh: fh.write(data), fsync=fsync)


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
