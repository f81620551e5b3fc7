"""Helpers shared by the test suite: real peers (DCMTK, the daemon as a subprocess), databases."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy

REPO = Path(__file__).resolve().parents[1]
GASTROLENS = [sys.executable, "-m", "gastrolens.cli"]
POSTGRES_ADMIN_URL = os.environ.get("GASTROLENS_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
READY = re.compile(r"GastroLens ready: AE title (\S+) on (\S+):(\d+)")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this test run (the kernel may offer
    the same one twice when a test picks ports for several peers before any binds)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def dcmtk(tool: str, *args: str, check: bool = False, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a DCMTK tool by full path (the venv shadows some names) with TCP_NODELAY=1."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([f"/usr/bin/{tool}", *args], env=env, capture_output=True, text=True,
                          check=check, timeout=timeout, **kwargs)


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema in the test PostgreSQL database; yields a URL that uses it, drops it after."""
    schema = f"gl_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def basic_config(tmp: Path, db_url: str, extra: str = "", port: int = 0) -> str:
    return f"""
[dicom]
ae_title = "GASTROLENS"
bind = "127.0.0.1"
port = {port}

[storage]
root = "{tmp / 'storage'}"
min_free_mb = 1

[database]
url = "{db_url}"
{extra}
"""


@dataclass
class Daemon:
    """`gastrolens serve` as a subprocess; its stderr is collected for assertions."""

    config: Path
    process: subprocess.Popen
    port: int
    ae_title: str
    log_lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def gastrolens(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*GASTROLENS, *args, "--config", str(self.config)], capture_output=True,
                              text=True, check=check, timeout=120)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_daemon(config: Path, timeout: float = 90, env: dict[str, str] | None = None) -> Daemon:
    # The config file alone decides: a developer's own GASTROLENS_* variables must not leak in.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GASTROLENS_")}
    process = subprocess.Popen([*GASTROLENS, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**clean, **(env or {})})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                raise RuntimeError(f"daemon exited with {process.returncode}:\n{''.join(lines)}")
            continue
        match = READY.search(line)
        if match:
            threading.Thread(target=lambda: [None for _ in iter(process.stdout.readline, "")], daemon=True).start()
            return Daemon(config, process, int(match.group(3)), match.group(1), lines)
    process.kill()
    raise RuntimeError(f"daemon not ready after {timeout} s:\n{''.join(lines)}")


# DCMTK storescu proposes uncompressed syntaxes unless told; these flags make it propose a
# file's own compressed transfer syntax so the bytes travel unconverted.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(port: int, *files: Path, aet: str = "ENDO_WS1", aec: str = "GASTROLENS",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Send ``files`` (all of one transfer syntax) in one association with DCMTK storescu."""
    from pydicom import dcmread

    syntax = str(dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return dcmtk("storescu", STORESCU_PROPOSE.get(syntax, "-xe"), "-aet", aet, "-aec", aec, *extra,
                 "127.0.0.1", str(port), *map(str, files))
