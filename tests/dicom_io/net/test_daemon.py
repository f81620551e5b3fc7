"""The daemon as users run it: `gastrolens serve` in a subprocess, DCMTK as the peer, the CLI beside it."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time

import pytest

from gastrolens.findings import LesionClass
from gastrolens.samples import as_dicom, endoscopy_frame
from support import GASTROLENS, basic_config, dcmtk, free_port, start_daemon, storescu, write_config


def model_section(package) -> str:
    return f'[model]\npackage = "{package}"\n'


@pytest.fixture
def daemon(tmp_path, db_url, tiny_model):
    config = write_config(tmp_path / "gastrolens.toml", basic_config(tmp_path, db_url, model_section(tiny_model)))
    running = start_daemon(config)
    yield running
    running.stop(signal.SIGKILL) if running.process.poll() is None else None


def test_push_status_and_verify(daemon, sample_files):
    assert dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(daemon.port)).returncode == 0
    for name in ("vl_jpeg", "sc_rgb"):
        assert storescu(daemon.port, sample_files[name]).returncode == 0
    status = json.loads(daemon.gastrolens("status", "--json").stdout)
    assert set(status["instances"]) == {"received", "claimed", "done", "failed"}
    assert sum(status["instances"].values()) == 2  # the scheduler may already be working on them
    assert status["quarantined"] == 0
    assert set(status["outputs"]) == {"pending", "sent", "retrying", "dead"}
    human = daemon.gastrolens("status").stdout
    assert "instances" in human and "deliveries" in human
    verify = daemon.gastrolens("audit", "verify")
    assert "intact" in verify.stdout
    assert daemon.stop() == 0


def test_api_is_served_when_enabled(tmp_path, sqlite_url, tiny_model):
    import httpx

    port = free_port()
    config = write_config(tmp_path / "gastrolens.toml",
                          basic_config(tmp_path, sqlite_url,
                                       extra=f"[api]\nenabled = true\nport = {port}\n" + model_section(tiny_model)))
    daemon = start_daemon(config)
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 200, health.text
        body = health.json()
        assert "gastrolens-untrained" in json.dumps(body)
        assert httpx.get(f"http://127.0.0.1:{port}/api/studies", timeout=10).status_code == 401
    finally:
        assert daemon.stop() == 0


def test_sigterm_finishes_in_flight_stores_and_exits_zero(daemon, tmp_path):
    burst = 200  # far more than is stored when the first one lands: the stop below comes mid-burst
    folder = tmp_path / "burst"
    folder.mkdir()
    frame, _ = endoscopy_frame(120, 160, LesionClass.AGC, seed=1)
    for i in range(burst):
        as_dicom(frame, jpeg_quality=85, instance_number=i + 1).save_as(folder / f"{i}.dcm", enforce_file_format=True)
    storage = tmp_path / "storage" / "instances"
    sender = subprocess.Popen(["/usr/bin/storescu", "-xy", "-aec", "GASTROLENS", "127.0.0.1", str(daemon.port),
                               "+sd", str(folder)], env={"TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not any(storage.rglob("*.dcm")):  # the burst is in flight once its first instance is stored
        assert sender.poll() is None and time.monotonic() < deadline, "the burst never started storing"
        time.sleep(0.02)
    stored_at_stop = len(list(storage.rglob("*.dcm")))
    assert sender.poll() is None and stored_at_stop < burst, "the burst was no longer in flight"
    assert daemon.stop(signal.SIGTERM) == 0
    sender.wait(timeout=60)
    # Whatever the peer was told succeeded is stored, recorded and audited; nothing half-written.
    files = list(storage.rglob("*.dcm"))
    assert not list(storage.rglob("*.part"))
    status = json.loads(subprocess.run([*GASTROLENS, "status", "--json", "--config", str(daemon.config)],
                                       capture_output=True, text=True, check=True).stdout)
    assert sum(status["instances"].values()) == len(files)
    assert len(files) >= stored_at_stop > 0
    # After the stop, nobody listens.
    assert dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(daemon.port)).returncode != 0


def test_audit_verify_names_the_first_broken_row(tmp_path, sample_files, tiny_model):
    db_path = tmp_path / "gastrolens.db"
    config = write_config(tmp_path / "gastrolens.toml",
                          basic_config(tmp_path, f"sqlite:///{db_path}", model_section(tiny_model)))
    daemon = start_daemon(config)
    assert storescu(daemon.port, sample_files["sc_rgb"]).returncode == 0
    assert daemon.stop() == 0
    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TRIGGER audit_events_no_update")
        row_id = conn.execute("SELECT id FROM audit_events WHERE event_type = 'instance.received'").fetchone()[0]
        conn.execute("UPDATE audit_events SET actor = 'dicom:SOMEONE_ELSE@10.0.0.1' WHERE id = ?", (row_id,))
    result = subprocess.run([*GASTROLENS, "audit", "verify", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"row id {row_id}" in result.stdout


def test_config_show_and_db_upgrade(tmp_path, sqlite_url):
    config = write_config(tmp_path / "gastrolens.toml", basic_config(tmp_path, sqlite_url))
    shown = subprocess.run([*GASTROLENS, "config", "show", "--config", str(config)],
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["database"]["url"] == sqlite_url
    upgraded = subprocess.run([*GASTROLENS, "db", "upgrade", "--config", str(config)],
                              capture_output=True, text=True, check=True)
    assert "latest schema" in upgraded.stdout


def test_bad_config_stops_the_start(tmp_path):
    config = write_config(tmp_path / "gastrolens.toml", "[dicom]\nport = 'x'\n")
    result = subprocess.run([*GASTROLENS, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert str(config) in result.stderr and "dicom.port" in result.stderr
