"""Roles: `gastrolens serve --role receiver` and `--role worker` on one database and one storage root.

The receiver takes the images and loads no model; nothing is processed until a worker runs;
the worker opens no DICOM port and processes and delivers them. Each reports its role and its
own parts on /healthz. A replica with ``migrate_on_start = false`` refuses a database it would
have to migrate.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gastrolens.db.states import AuditEventType
from pipeline_e2e.peers import DatabaseView, folder_destination, make_study, pipeline_config, wait_for
from support import GASTROLENS, free_port, postgres_schema, storescu, write_config

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

READY = re.compile(r"GastroLens ready: (.*)")
DICOM = re.compile(r"AE title (\S+) on (\S+):(\d+)")


@dataclass
class Served:
    process: subprocess.Popen
    ready: str
    api: str
    lines: list[str] = field(default_factory=list)

    @property
    def dicom_port(self) -> int | None:
        match = DICOM.search(self.ready)
        return int(match.group(3)) if match else None

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.api}/healthz", timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=90)


def serve(config: Path, *args: str, timeout: float = 120) -> Served:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GASTROLENS_")}
    process = subprocess.Popen([*GASTROLENS, "serve", "--config", str(config), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=clean)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}:\n{''.join(lines)}")
            continue
        if match := READY.search(line):
            threading.Thread(target=lambda: [None for _ in iter(process.stdout.readline, "")], daemon=True).start()
            api = re.search(r"API on (http://\S+?)(?:,|\s|$)", match.group(1))
            assert api, line
            return Served(process, match.group(1), api.group(1), lines)
    process.kill()
    raise RuntimeError(f"serve not ready after {timeout} s:\n{''.join(lines)}")


def role_config(tmp: Path, url: str, model: Path, outbox: Path) -> str:
    return pipeline_config(tmp, url, model, destinations=folder_destination("archive", outbox), batch_size=4) + f"""
[api]
enabled = true
port = {free_port()}
"""


@pytest.fixture
def postgres_url():
    with postgres_schema() as url:
        yield url


def test_receiver_takes_images_and_a_worker_processes_them(tmp_path, postgres_url, tiny_model):
    outbox = tmp_path / "outbox"
    started: list[Served] = []
    view = DatabaseView(postgres_url)
    try:
        receiver = serve(write_config(tmp_path / "r.toml", role_config(tmp_path, postgres_url, tiny_model, outbox)),
                         "--role", "receiver")
        started.append(receiver)
        assert receiver.dicom_port and "[role receiver]" in receiver.ready and "model" not in receiver.ready
        body = receiver.health().json()
        assert body["role"] == "receiver" and body["status"] == "ok", body
        assert set(body["components"]) == {"database", "storage", "receiver"}, body

        study = make_study(tmp_path / "study", [(None, "jpeg")] * 6, rows=64, cols=80, seed=7)
        sent = storescu(receiver.dicom_port, *study.files)
        assert sent.returncode == 0, sent.stderr
        time.sleep(3)  # several scheduler intervals: a receiver must not have touched them
        assert view.instance_states() == {"received": 6}, view.instance_states()
        assert view.events(AuditEventType.MODEL_LOADED) == []

        worker_config = role_config(tmp_path, postgres_url, tiny_model, outbox).replace(
            "[model]", '[daemon]\nrole = "worker"\n\n[model]')
        worker = serve(write_config(tmp_path / "w.toml", worker_config))
        started.append(worker)
        assert worker.dicom_port is None and "[role worker]" in worker.ready, worker.ready
        body = worker.health().json()
        assert body["role"] == "worker" and body["status"] == "ok", body
        assert set(body["components"]) == {"database", "storage", "scheduler", "model"}, body

        wait_for(lambda: view.everything_sent(6, 1), 120, "the worker processed and delivered every image",
                 logs=lambda: "".join(worker.lines))
        assert view.results_per_instance() == {uid: 1 for uid in study.sop_uids}
        (loaded,) = view.events(AuditEventType.MODEL_LOADED)
        assert loaded.actor.endswith(f":{worker.process.pid}")
        roles = {e.actor.rsplit(":", 1)[1]: (e.detail or "") for e in view.events(AuditEventType.SERVICE_STARTED)}
        assert '"receiver"' in roles[str(receiver.process.pid)] and '"worker"' in roles[str(worker.process.pid)]
        assert receiver.stop() == 0 and worker.stop() == 0
    finally:
        for served in started:
            if served.process.poll() is None:
                served.process.kill()
        view.close()


def test_a_replica_that_must_not_migrate_refuses_an_old_schema(tmp_path, postgres_url, tiny_model):
    config = pipeline_config(tmp_path, postgres_url, tiny_model) + "\n[daemon]\nmigrate_on_start = false\n"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GASTROLENS_")}
    done = subprocess.run([*GASTROLENS, "serve", "--config", str(write_config(tmp_path / "c.toml", config))],
                          capture_output=True, text=True, timeout=120, env=clean)
    assert done.returncode != 0
    assert "gastrolens db upgrade" in done.stderr, done.stderr
