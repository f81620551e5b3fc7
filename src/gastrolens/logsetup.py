"""One logging set-up for every GastroLens process (the CLI and the receiver processes it spawns)."""

from __future__ import annotations

import logging
import sys

_NOISY = {
    "apscheduler": logging.ERROR,  # job runs and skipped ticks
    "highdicom": logging.WARNING,  # one line per copied module
    "alembic": logging.WARNING,  # plugin set-up lines on every schema check
}


def configure(level: int | str, *, tag: str = "") -> None:
    """Log to stderr at ``level``; ``tag`` names the process in every line (e.g. ``gl-receiver-0``)."""
    prefix = f"[{tag}] " if tag else ""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    for name, floor in _NOISY.items():
        logging.getLogger(name).setLevel(floor)
