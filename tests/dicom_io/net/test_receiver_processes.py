"""Several receiver processes on one port: concurrent stores, one intact audit chain, a node-wide limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import func, select

from gastrolens.config import Settings
from gastrolens.daemon.receivers import PROCESS_NAME, ReceiverPool
from gastrolens.db import Database, audit
from gastrolens.db.tables import Instance
from gastrolens.findings import LesionClass
from gastrolens.samples import as_dicom, endoscopy_frame
from support import dcmtk

ASSOCIATIONS = 4
PER_ASSOCIATION = 12


def poll(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def pool_settings(db_url: str, tmp_path: Path):
    def make(**dicom: object) -> Settings:
        return Settings.model_validate(
            {
                "dicom": {"port": 0, **dicom},
                "storage": {"root": str(tmp_path / "storage"), "min_free_mb": 1},
                "database": {"url": db_url},
            }
        )

    db = Database(db_url)
    db.upgrade()
    yield make
    db.dispose()


@pytest.fixture
def folders(tmp_path: Path) -> list[Path]:
    made = []
    for a in range(ASSOCIATIONS):
        folder = tmp_path / f"send-{a}"
        folder.mkdir()
        for i in range(PER_ASSOCIATION):
            frame, _ = endoscopy_frame(48, 64, LesionClass.PU if i % 2 else None, seed=a * 100 + i)
            as_dicom(frame, jpeg_quality=90, instance_number=i + 1).save_as(
                folder / f"{i}.dcm", enforce_file_format=True
            )
        made.append(folder)
    return made


def test_concurrent_stores_over_two_processes_keep_one_intact_audit_chain(pool_settings, folders, db_url):
    stored: list[int] = []
    pool = ReceiverPool(pool_settings(max_associations=ASSOCIATIONS), 2, on_stored=lambda: stored.append(1))
    pool.start()
    try:
        pids = pool.pids
        assert all(Path(f"/proc/{pid}/comm").read_text().strip() == PROCESS_NAME for pid in pids)
        senders = [
            subprocess.Popen(
                ["/usr/bin/storescu", "-aec", "GASTROLENS", "-xy", "127.0.0.1", str(pool.port), "+sd", str(folder)],
                env={"TCP_NODELAY": "1"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for folder in folders
        ]
        outputs = [(s.wait(timeout=300), s.stdout.read() if s.stdout else "") for s in senders]
        assert all(code == 0 for code, _ in outputs), outputs
        assert poll(lambda: len(stored) == ASSOCIATIONS * PER_ASSOCIATION, 10)
    finally:
        pool.stop(drain_seconds=10)
    db = Database(db_url)
    try:
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == ASSOCIATIONS * PER_ASSOCIATION
            report = audit.verify_chain(s)
        assert report.intact, report
        assert report.rows >= ASSOCIATIONS * PER_ASSOCIATION
    finally:
        db.dispose()
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "gastrolens.cli",
            "audit",
            "verify",
            "--config",
            str(_config_file(pool_settings, folders[0].parent, db_url)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0 and "intact" in verify.stdout, verify.stdout + verify.stderr


def _config_file(_make, folder: Path, db_url: str) -> Path:
    path = folder / "gastrolens.toml"
    path.write_text(f'[storage]\nroot = "{folder / "storage"}"\nmin_free_mb = 1\n[database]\nurl = "{db_url}"\n')
    return path


def test_max_associations_is_a_limit_for_the_whole_node(pool_settings):
    pool = ReceiverPool(pool_settings(max_associations=1), 2)
    pool.start()
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", pool.port, ae_title="GASTROLENS")
        try:
            assert held.is_established
            # Connections land on either process; none may take a second slot.
            for _ in range(6):
                assert dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(pool.port)).returncode != 0
        finally:
            held.release()
        echo = lambda: dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(pool.port)).returncode == 0  # noqa: E731
        assert poll(echo, 5)
    finally:
        pool.stop(drain_seconds=5)


def test_receiver_processes_drain_on_sigterm_and_die_with_the_daemon(pool_settings, tmp_path):
    settings = pool_settings()
    script = textwrap.dedent(f"""
        import json, sys, time
        from gastrolens.config import Settings
        from gastrolens.daemon.receivers import ReceiverPool
        if __name__ == "__main__":
            pool = ReceiverPool(Settings.model_validate(json.loads({settings.model_dump_json()!r})), 2)
            pool.start()
            print(" ".join(str(pid) for pid in pool.pids), flush=True)
            time.sleep(600)
        """)
    (tmp_path / "daemon.py").write_text(script)
    daemon = subprocess.Popen(
        [sys.executable, str(tmp_path / "daemon.py")], stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL
    )
    try:
        assert daemon.stdout is not None
        pids = [int(p) for p in daemon.stdout.readline().split()]
        assert len(pids) == 2
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
        assert poll(lambda: not any(_alive(pid) for pid in pids), 10), "receiver processes outlived the daemon"
    finally:
        daemon.kill()

    pool = ReceiverPool(settings, 2)
    pool.start()
    assert pool.stop(drain_seconds=5) == [0, 0], "each process drains and exits 0 on SIGTERM"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_concurrent_associations_are_spread_over_the_processes(pool_settings):
    """The daemon hands each connection to the least busy process (SO_REUSEPORT would hash
    two connections onto one process half the time, and two associations would share a GIL)."""
    pool = ReceiverPool(pool_settings(max_associations=4), 2)
    pool.start()
    held = []
    try:
        for name in ("FIRST", "SECOND"):
            ae = AE(ae_title=name)
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", pool.port, ae_title="GASTROLENS")
            assert assoc.is_established
            held.append(assoc)
        assert pool.loads() == [1, 1]
        for assoc in held:
            assoc.release()
        assert poll(lambda: pool.loads() == [0, 0], 5), pool.loads()
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()
        pool.stop(drain_seconds=5)


def test_a_receiver_process_that_dies_is_started_again_and_frees_its_slots(pool_settings):
    """A crash (here SIGKILL) must not leave the node one process short, nor leak the
    association it held against the node-wide ``max_associations``."""
    pool = ReceiverPool(pool_settings(max_associations=1), 2)
    pool.start()
    try:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", pool.port, ae_title="GASTROLENS")
        assert held.is_established
        holder = pool.pids[pool.loads().index(1)]
        before = set(pool.pids)
        os.kill(holder, signal.SIGKILL)
        assert poll(lambda: pool.restarts == 1 and pool.listening, 60), "the dead process was not started again"
        assert holder not in pool.pids and len(set(pool.pids) - before) == 1
        echo = lambda: dcmtk("echoscu", "-aec", "GASTROLENS", "127.0.0.1", str(pool.port)).returncode == 0  # noqa: E731
        assert poll(echo, 10), "the dead process's association still counts against max_associations"
        if held.is_established:
            held.abort()
    finally:
        pool.stop(drain_seconds=5)
