"""Hundreds of mutated DICOM files against one daemon: every one answered, nothing lost, nothing leaked.

Per case: the C-STORE status is one a peer can act on (success, or 0xA900 / 0xC000 with
the file quarantined), never pynetdicom's 0xC211 for a handler that raised, never 0xA700
for a header the database could not hold, and the daemon answers C-ECHO on the same
association right after. At the end: every success has exactly one instance row and a
file whose sha256 matches it, every failure is quarantined (file, note, row) and
audited, the queue drains to done/failed with the daemon still up, nothing was written
outside the storage root, and ``gastrolens audit verify`` passes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from .conftest import TALLY, Node
from .mutations import Case, Category, generate, write

ASSOCIATIONS = 3
SUCCESS = {0x0000, 0xB000, 0xB006, 0xB007}
REFUSED = {0xA900, 0xC000}
EXPECTED = {Category.CLEAN: SUCCESS, Category.ABSURD_GEOMETRY: {0xA900}}
"""Categories whose answer is known; the others may be stored or refused, but must be answered."""


@pytest.fixture(autouse=True)
def send_files_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's chunked send streams a file's data set unparsed, however broken it is."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _associate(port: int, cases: list[Case]) -> AE:
    ae = AE(ae_title="ROBUST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for pair in sorted({(c.sop_class_uid, c.transfer_syntax_uid) for c in cases}):
        ae.add_requested_context(*pair[:1], [pair[1]])  # one context per syntax: each file travels as it is
    ae.add_requested_context(Verification)
    return ae


def _send(node: Node, cases: list[Case], folder: Path) -> dict[int, tuple[int | None, bool]]:
    """Status and C-ECHO result per case number, over a few long associations."""
    answers: dict[int, tuple[int | None, bool]] = {}
    chunks = [cases[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)]
    for chunk in chunks:
        ae = _associate(node.port, chunk)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="GASTROLENS")
        assert assoc.is_established, "the daemon refused a plain association"
        for case in chunk:
            if not assoc.is_established:  # the daemon dropped the previous one: that case already failed
                assoc = ae.associate("127.0.0.1", node.port, ae_title="GASTROLENS")
                assert assoc.is_established
            path = write(case, folder)
            try:
                status = assoc.send_c_store(path)
                code = int(status.Status) if "Status" in status else None
            except Exception:  # the association died under us
                code = None
            echo = assoc.send_c_echo() if assoc.is_established else None
            answers[case.number] = (code, bool(echo is not None and "Status" in echo and echo.Status == 0))
            path.unlink()
        if assoc.is_established:
            assoc.release()
    return answers


def _wait_drained(db: Path, deadline_s: float) -> Counter[str]:
    deadline = time.monotonic() + deadline_s
    while True:
        with sqlite3.connect(db) as conn:
            states = Counter(dict(conn.execute("SELECT state, count(*) FROM instances GROUP BY state").fetchall()))
        if set(states) <= {"done", "failed"} or time.monotonic() > deadline:
            return states
        time.sleep(0.5)  # polling the database with a deadline, not synchronising on time


def _files_outside(folder: Path, storage: Path) -> set[Path]:
    """Files under ``folder`` but not under the storage root (the database files aside)."""
    return {
        p
        for p in folder.rglob("*")
        if p.is_file() and storage not in p.parents and not p.name.startswith("gastrolens.db")
    }


def test_mutated_inputs_are_answered_stored_or_quarantined(
    node: Node, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    count = int(request.config.getoption("--robustness-cases"))
    seed = int(request.config.getoption("--robustness-seed"))
    cases = generate(count, seed)
    outside_before = _files_outside(node.folder, node.storage)
    answers = _send(node, cases, tmp_path)

    problems = []
    for case in cases:
        code, echoed = answers[case.number]
        outcome = "no answer" if code is None else f"0x{code:04X}"
        TALLY[("mutations", case.category.value, outcome)] += 1
        allowed = EXPECTED.get(case.category, SUCCESS | REFUSED)
        if code not in allowed:
            problems.append(f"{case.name}: answered {outcome}, expected one of {sorted(f'0x{a:04X}' for a in allowed)}")
        if not echoed:
            problems.append(f"{case.name}: no C-ECHO answer right after it")
    assert node.process.poll() is None, f"the daemon died:\n{node.log[-4000:]}"

    successes = sum(1 for code, _ in answers.values() if code in SUCCESS)
    refused = sum(1 for code, _ in answers.values() if code in REFUSED)
    db = node.folder / "gastrolens.db"
    states = _wait_drained(db, deadline_s=max(60.0, count * 0.3))
    with sqlite3.connect(db) as conn:
        instances = conn.execute("SELECT sop_instance_uid, file_path, sha256, size_bytes FROM instances").fetchall()
        quarantined = conn.execute("SELECT id, file_path, sha256, status FROM quarantine").fetchall()
        audited = [
            json.loads(d)
            for (d,) in conn.execute(
                "SELECT detail FROM audit_events WHERE event_type = 'instance.quarantined'"
            ).fetchall()
        ]
    assert len(instances) == successes, f"{successes} successes, {len(instances)} instance rows"
    assert len({sop for sop, *_ in instances}) == len(instances), "an instance has two rows"
    for sop, file_path, sha256, size in instances:
        stored = node.storage / file_path
        assert stored.is_file(), f"{sop}: no file at {file_path}"
        data = stored.read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha256, size), f"{sop}: file does not match its row"
    assert len(quarantined) == refused, f"{refused} refusals, {len(quarantined)} quarantine rows"
    audited_paths = Counter(d.get("path") for d in audited)
    for _, file_path, sha256, status in quarantined:
        assert status in REFUSED, f"quarantined {file_path} with status {status:#06x}"
        kept = node.storage / file_path
        assert kept.is_file() and hashlib.sha256(kept.read_bytes()).hexdigest() == sha256
        assert json.loads(kept.with_suffix(".json").read_text())["reason"]
        assert audited_paths[file_path] == 1, f"quarantined {file_path} audited {audited_paths[file_path]} times"
    assert set(states) <= {"done", "failed"}, f"the queue did not drain: {dict(states)}"
    TALLY[("mutations", "pipeline", "instances done")] += states.get("done", 0)
    TALLY[("mutations", "pipeline", "instances failed (with reason)")] += states.get("failed", 0)
    assert node.process.poll() is None, f"the daemon died while processing:\n{node.log[-4000:]}"

    written_outside = _files_outside(node.folder, node.storage) - outside_before
    assert not written_outside, f"written outside the storage root: {sorted(written_outside)[:10]}"
    assert not list(node.cwd.iterdir()), f"written into the working directory: {list(node.cwd.iterdir())[:10]}"
    verify = node.gastrolens("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not problems, f"{len(problems)} of {len(cases)} cases misbehaved:\n" + "\n".join(problems[:40])
