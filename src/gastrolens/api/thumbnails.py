"""Overlay outputs (RGB Secondary Capture DICOM) decoded to PNG thumbnails on the fly."""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from gastrolens.dicom_io.documents.read import decode_rgb_frames
from gastrolens.errors import DecodeError

log = logging.getLogger(__name__)

CACHE_ENTRIES = 256
_cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
_lock = threading.Lock()


def overlay_png(store_root: Path, relative_path: str, size: int) -> bytes | None:
    """The first frame of the stored file as a PNG whose longest side is at most ``size``.

    None when the file is missing, outside the storage root, or cannot be decoded.
    """
    root = store_root.resolve()
    path = (root / relative_path).resolve()
    if not path.is_relative_to(root):
        log.warning("overlay path %s leaves the storage root; refused", relative_path)
        return None
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    key = (str(path), stamp, size)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        frame = decode_rgb_frames(path)[0]
    except (DecodeError, OSError, IndexError) as exc:
        log.warning("overlay %s cannot be decoded: %s", relative_path, exc)
        return None
    picture = Image.fromarray(frame)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    png = buffer.getvalue()
    with _lock:
        _cache[key] = png
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return png


def overlay_available(store_root: Path, relative_path: str) -> bool:
    """Whether the overlay's file is still stored (the dashboard shows a placeholder otherwise)."""
    try:
        return (store_root / relative_path).is_file()
    except OSError:
        return False
