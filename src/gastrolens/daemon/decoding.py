"""Decoding stored instances to RGB frames, in worker processes sized to the cores.

An HD endoscopy frame (1080 x 1350 JPEG) takes about 90 ms to decode on one core
(libjpeg plus the YBR to RGB conversion), and pydicom holds the GIL for much of it,
so threads do not scale: the daemon decodes in a pool of spawned processes, one per
core by default (``[scheduler] decode_processes``), while the engine works on the
previous batch. Each worker reports the CPU seconds it spent so the daemon can count
them toward ``gastrolens_stage_cpu_seconds{stage="decode"}``.

This module imports pydicom and the decoders only (never torch), so workers start light.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from gastrolens.dicom_io.documents.read import decode_rgb_frames, read_dataset
from gastrolens.errors import GastroLensError

MAX_DEFAULT_PROCESSES = 32


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
        decoded.frames = decode_rgb_frames(decoded.dataset)
    except (GastroLensError, OSError) as exc:
        decoded.error = f"cannot decode: {exc}"
        decoded.frames = []
    except Exception as exc:  # a corrupt stream can raise anything from a decoder plugin
        decoded.error = f"cannot decode: {exc.__class__.__name__}: {exc}"
        decoded.frames = []
    decoded.cpu_seconds = time.thread_time() - started
    return decoded


def decode_process_count(setting: int | None, cpus: int | None = None) -> int:
    """Worker processes for ``[scheduler] decode_processes``: None means one per CPU (at most 32)."""
    if setting is not None:
        return setting
    return max(1, min(MAX_DEFAULT_PROCESSES, cpus if cpus is not None else (os.cpu_count() or 1)))
