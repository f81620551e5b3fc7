"""Worker processes that build SEG / SR / overlay objects beside inference.

highdicom and pydicom are pure Python and hold the GIL, so building outputs in the
daemon's own process serialises with everything else. This module is all a worker
imports besides `gastrolens.dicom_io` (never torch), so workers start light.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1


def output_workers(processes: int) -> ProcessPoolExecutor:
    # spawn, not fork: the daemon holds torch's thread pools, which do not survive a fork
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_leave_signals_to_the_daemon)


def _leave_signals_to_the_daemon() -> None:
    """Workers ignore SIGINT/SIGTERM (sent to the whole group by Ctrl-C or systemd): the
    daemon finishes its batch and then shuts them down. If the daemon itself dies
    (SIGKILL), Linux kills them too instead of leaving orphans."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
