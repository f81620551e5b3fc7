"""One daemon per test module, started once, and a tally of outcomes printed at the end of the session.

The ``--robustness-cases N`` option is declared in ``tests/conftest.py``: pytest takes
``pytest_addoption`` only from the root conftest files and plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import GASTROLENS, READY, REPO, free_port

VIEWER_TOKEN = "robustness-viewer-token-0123456789abcdef"
AUDITOR_TOKEN = "robustness-auditor-token-0123456789abcdef"
MAX_ASSOCIATIONS = 4
ACSE_TIMEOUT = 2.0

TALLY: Counter[tuple[str, str, str]] = Counter()
"""(suite, category, outcome) -> count, printed by pytest_terminal_summary."""


@dataclass
class Node:
    """A running `gastrolens serve` and where it keeps things."""

    process: subprocess.Popen[str]
    config: Path
    folder: Path
    cwd: Path
    storage: Path
    port: int
    api_url: str
    log_lines: list[str]

    def gastrolens(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*GASTROLENS, *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.cwd,
            env=_clean_env(),
        )

    @property
    def log(self) -> str:
        return "".join(self.log_lines)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GASTROLENS_")}
    env["PYTHONPATH"] = str(REPO / "src")
    return env


def _hash(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Node]:
    """The daemon on SQLite with the tiny model, its API on, run from an empty working directory
    (so that anything it writes outside the storage root shows)."""
    folder = tmp_path_factory.mktemp("robust-node")
    cwd = folder / "cwd"
    cwd.mkdir()
    storage = folder / "storage"
    api_port = free_port()
    config = folder / "gastrolens.toml"
    config.write_text(f"""
[dicom]
ae_title = "GASTROLENS"
bind = "127.0.0.1"
port = 0
max_associations = {MAX_ASSOCIATIONS}
network_timeout_seconds = 20
acse_timeout_seconds = {ACSE_TIMEOUT}
receiver_processes = 1

[storage]
root = "{storage}"
min_free_mb = 1

[database]
url = "sqlite:///{folder / "gastrolens.db"}"

[model]
package = "{tiny_model}"
device = "cpu"
batch_size = 8
cpu_threads = 1

[scheduler]
interval_seconds = 1
study_quiet_seconds = 3
decode_threads = 1
decode_processes = 0
output_processes = 0

[api]
enabled = true
port = {api_port}

[[api.tokens]]
name = "viewer"
role = "viewer"
sha256 = "{_hash(VIEWER_TOKEN)}"

[[api.tokens]]
name = "auditor"
role = "auditor"
sha256 = "{_hash(AUDITOR_TOKEN)}"
""")
    process = subprocess.Popen(
        [*GASTROLENS, "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=_clean_env(),
    )
    lines: list[str] = []
    assert process.stderr is not None and process.stdout is not None
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    port = 0
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}:\n{''.join(lines)}")
        match = READY.search(line)
        if match:
            port = int(match.group(3))
            break
    else:
        process.kill()
        raise RuntimeError(f"daemon not ready:\n{''.join(lines)}")
    out = process.stdout
    threading.Thread(target=lambda: [None for _ in iter(out.readline, "")], daemon=True).start()
    running = Node(process, config, folder, cwd, storage, port, f"http://127.0.0.1:{api_port}", lines)
    yield running
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY:
        return
    terminalreporter.section("robustness: cases per suite, category and outcome")
    suites = sorted({suite for suite, _, _ in TALLY})
    for suite in suites:
        rows = sorted((c, o, n) for (s, c, o), n in TALLY.items() if s == suite)
        total = sum(n for _, _, n in rows)
        terminalreporter.write_line(f"{suite}: {total} cases")
        for category, outcome, count in rows:
            terminalreporter.write_line(f"  {category:<28} {outcome:<34} {count:>5}")
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "robustness-summary.json").write_text(
        json.dumps(
            [{"suite": s, "category": c, "outcome": o, "count": n} for (s, c, o), n in sorted(TALLY.items())], indent=1
        )
    )
