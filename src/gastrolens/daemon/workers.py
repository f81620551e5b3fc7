"""Worker processes that build SEG / SR / overlay objects beside inference.

highdicom and pydicom are pure Python and hold the GIL, so building outputs in the
daemon's own process serialises with everything else. This module is all a worker
imports besides `gastrolens.dicom_io` (never torch, sqlalchemy or alembic:
tests/dicom_io/documents/test_workers.py), so workers start light.

Submit :func:`write_outputs_in_worker` (same arguments as ``write_outputs``): its
result's ``cpu_seconds`` is all the CPU time the worker process spent on that image,
unpickling the source and frames included, for ``metrics.add_stage_cpu(Stage.OUTPUTS, ...)``.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from gastrolens.daemon.pools import WorkerPool
from gastrolens.dicom_io.documents.outputs import WrittenOutputs, write_outputs
from gastrolens.findings import ImageFinding

PR_SET_PDEATHSIG = 1

_cpu_mark = time.process_time()
"""Process CPU time when the worker last finished an image (or started)."""


def output_workers(processes: int) -> WorkerPool:
    return WorkerPool(processes, _leave_signals_to_the_daemon, name="output")


def write_outputs_in_worker(
    source: Dataset, findings: Sequence[ImageFinding], out_dir: Path, *args: Any, **kwargs: Any
) -> WrittenOutputs:
    """``write_outputs`` in a worker process, charged with the process's CPU time since
    its previous image: unpickling this image's arguments counts, idle waiting does not
    (the result's own pickling is charged to the next image)."""
    global _cpu_mark
    try:
        written = write_outputs(source, findings, out_dir, *args, **kwargs)
    finally:
        spent = time.process_time() - _cpu_mark
        _cpu_mark += spent
    written.cpu_seconds = spent
    return written


def _leave_signals_to_the_daemon() -> None:
    """Workers ignore SIGINT/SIGTERM (sent to the whole group by Ctrl-C or systemd): the
    daemon finishes its batch and then shuts them down. If the daemon itself dies
    (SIGKILL), Linux kills them too instead of leaving orphans."""
    global _cpu_mark
    _cpu_mark = time.process_time()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
