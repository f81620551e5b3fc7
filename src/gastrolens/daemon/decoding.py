"""Decoding stored instances to RGB frames, in worker processes sized to the cores.

An HD endoscopy frame (1080 x 1350 JPEG) takes about 90 ms to decode on one core
(libjpeg plus the YBR to RGB conversion), and pydicom holds the GIL for much of it,
so threads do not scale: the daemon decodes in a pool of spawned processes, one per
core by default (``[scheduler] decode_processes``), while the engine works on the
previous batch. Each worker reports the CPU seconds it spent so the daemon can count
them toward ``gastrolens_stage_cpu_seconds{stage="decode"}``.

JPEG Baseline colour frames (what endoscopes send) take a fast path: each frame's
JPEG stream is decoded by Pillow (libjpeg-turbo), which converts YCbCr to RGB in SIMD
code, about 5 times faster than pydicom's decoder plus its NumPy colour conversion
(16 ms instead of 105 ms for 1080 x 1350). JPEG decoders may differ by a few levels
(upsampling and IDCT rounding are not fixed by the standard); tests hold the fast
path to pydicom's result within :data:`PARITY_MAX_LEVELS`. Anything else, or anything
the fast path is not sure of, goes through
:func:`gastrolens.dicom_io.documents.read.decode_rgb_frames`.

This module imports pydicom and the decoders only (never torch), so workers start light.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit

from gastrolens.daemon.pools import WorkerPool
from gastrolens.dicom_io.documents.read import decode_rgb_frames, read_dataset
from gastrolens.errors import GastroLensError

MAX_DEFAULT_PROCESSES = 32
PR_SET_PDEATHSIG = 1
PARITY_MAX_LEVELS = 8
"""Largest difference (0-255) allowed between the fast path and pydicom's decoder."""
_FAST_PHOTOMETRIC = ("YBR_FULL_422", "YBR_FULL")
_MAX_SIDE = 8192


@dataclass
class Decoded:
    """One instance read and decoded, or the reason it could not be."""

    dataset: Dataset | None = None
    frames: list[np.ndarray] = field(default_factory=list)
    error: str | None = None
    cpu_seconds: float = 0.0


def decode_instance(path: Path) -> Decoded:
    """Read ``path`` and decode every frame to RGB uint8; never raises for a bad file.

    Runs in a worker process or a thread; ``cpu_seconds`` is the calling thread's CPU
    time. The daemon checks the frames' shapes afterwards (that check lives beside the
    networks, which a worker does not import).
    """
    started = time.thread_time()
    decoded = Decoded()
    try:
        decoded.dataset = read_dataset(path)
        decoded.frames = jpeg_baseline_frames(decoded.dataset) or decode_rgb_frames(decoded.dataset)
    except (GastroLensError, OSError) as exc:
        decoded.error = f"cannot decode: {exc}"
        decoded.frames = []
    except Exception as exc:  # a corrupt stream can raise anything from a decoder plugin
        decoded.error = f"cannot decode: {exc.__class__.__name__}: {exc}"
        decoded.frames = []
    decoded.cpu_seconds = time.thread_time() - started
    return decoded


_cpu_mark = time.process_time()
"""This worker process's CPU time when it last finished an instance (or started)."""


def decode_workers(processes: int) -> WorkerPool:
    """Spawned decode workers, started at once with their decoders imported.

    Starting them here (not on the first batch) keeps the start-up off the first
    images' latency and out of their CPU account.
    """
    return WorkerPool(processes, _start_worker, name="decode")


def decode_instance_in_worker(path: Path) -> Decoded:
    """:func:`decode_instance` in a worker process, charged with the process's CPU time
    since its previous instance: unpickling the arguments counts, and so does pickling
    the previous result; idle waiting does not."""
    global _cpu_mark
    decoded = decode_instance(path)
    spent = time.process_time() - _cpu_mark
    _cpu_mark += spent
    decoded.cpu_seconds = spent
    return decoded


def _start_worker() -> None:
    """Import the decoders; leave SIGINT/SIGTERM to the daemon (it shuts the pool down after
    its batch); die with the daemon (SIGKILL) instead of lingering as an orphan."""
    global _cpu_mark
    import pydicom.pixels  # noqa: F401
    from PIL import JpegImagePlugin  # noqa: F401 - imported now, not on the first image

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _cpu_mark = time.process_time()


def decode_process_count(setting: int | None, cpus: int | None = None) -> int:
    """Worker processes for ``[scheduler] decode_processes``: None means one per CPU (at most 32)."""
    if setting is not None:
        return setting
    return max(1, min(MAX_DEFAULT_PROCESSES, cpus if cpus is not None else (os.cpu_count() or 1)))


def jpeg_baseline_frames(ds: Dataset) -> list[np.ndarray] | None:
    """RGB frames of a JPEG Baseline YBR colour instance decoded by libjpeg-turbo, or None.

    None means "not sure": another transfer syntax or photometric interpretation, a
    stream that says it is not YCbCr (Adobe transform 0), frames whose size or count
    differ from the header; the caller then uses the reference decoder.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != JPEGBaseline8Bit or "PixelData" not in ds:
        return None
    if (str(ds.get("PhotometricInterpretation", "")).strip() not in _FAST_PHOTOMETRIC
            or ds.get("SamplesPerPixel") != 3 or ds.get("BitsAllocated") != 8):
        return None
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if not (0 < rows <= _MAX_SIDE and 0 < cols <= _MAX_SIDE):
        return None
    try:
        count = int(ds.get("NumberOfFrames") or 1)
        frames = []
        for stream in generate_frames(ds.PixelData, number_of_frames=count):
            with Image.open(io.BytesIO(stream)) as image:
                if (image.format != "JPEG" or image.mode != "RGB" or image.size != (cols, rows)
                        or image.info.get("adobe_transform", 1) == 0):
                    return None
                frames.append(np.array(image))  # a writable copy, as the reference decoder gives
    except Exception:  # any doubt: the reference decoder decides and reports
        return None
    if len(frames) != count:
        return None
    return frames
