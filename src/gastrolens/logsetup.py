"""One logging set-up for every GastroLens process (the CLI and the receiver processes it spawns).

Two formats, both on stderr: ``text`` (one readable line a record) and ``json`` (one JSON object
a line, for log collectors: Kubernetes, journald, Loki), chosen by ``[logging] format``. The
chosen format is also put in the environment (:data:`FORMAT_ENV`), so that processes the daemon
spawns (receiver processes, worker pools) log the same way without being told.
"""

from __future__ import annotations

import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter

FORMAT_ENV = "GASTROLENS_LOG_FORMAT"
"""Not a settings override (those have a ``__``): the format this process tree logs in."""

_NOISY = {
    "apscheduler": logging.ERROR,  # job runs and skipped ticks
    "highdicom": logging.WARNING,  # one line per copied module
    "alembic": logging.WARNING,  # plugin set-up lines on every schema check
}


def configure(level: int | str, *, tag: str = "", fmt: str | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (text or json; default: :data:`FORMAT_ENV`, else text).

    ``tag`` names the process in every record (e.g. ``gl-receiver-0``). Calling again replaces
    the set-up (``serve`` does, once it has read the settings).
    """
    fmt = fmt or os.environ.get(FORMAT_ENV) or "text"
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}: text or json")
    os.environ[FORMAT_ENV] = fmt
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(  # time: ISO 8601 in UTC; a traceback in exc_info
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"process": tag} if tag else {},
            timestamp="time",
        ))
    else:
        prefix = f"[{tag}] " if tag else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name, floor in _NOISY.items():
        logging.getLogger(name).setLevel(floor)
