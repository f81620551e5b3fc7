"""kill -9 in the middle of a batch, start again with the same configuration: nothing lost, nothing doubled.

The killed process's claims expire after ``lease_seconds`` and the new process claims them
again. Every instance ends with exactly one result, every output with exactly one delivery,
sent. At the destination (storescp writing a new file for every copy) a SOP instance may
arrive twice only when the process died between the peer's success and the database
commit; such a copy must be the same object.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from gastrolens.db.states import AuditEventType
from gastrolens.findings import LesionClass
from pipeline_e2e.peers import (
    STORESCP,
    DatabaseView,
    detail,
    dicom_destination,
    make_study,
    pipeline_config,
    start_storescp,
    wait_for,
)
from support import storescu

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(STORESCP).exists(), reason="needs DCMTK")]

COUNT, BATCH, LEASE_SECONDS = 32, 8, 3


def test_sigkill_mid_batch_then_restart(tmp_path, sqlite_url, tiny_model, daemons):
    scp = start_storescp(tmp_path, unique_names=True)
    try:
        _run(tmp_path, sqlite_url, tiny_model, daemons, scp)
    finally:
        scp.stop()


def _run(tmp_path, sqlite_url, tiny_model, daemons, scp):
    config = pipeline_config(tmp_path, sqlite_url, tiny_model, batch_size=BATCH, lease_seconds=LEASE_SECONDS,
                             destinations=dicom_destination("pacs", scp.ae_title, scp.port))
    looks = [([None, LesionClass.PU, LesionClass.AGC, LesionClass.SMT][i % 4], "jpeg") for i in range(COUNT)]
    studies = [make_study(tmp_path / f"study{s}", looks[s::2], seed=50 * s, patient_id=f"GL-KILL-{s}")
               for s in range(2)]
    view = DatabaseView(sqlite_url)
    first = daemons(config, tmp_path / "gastrolens.toml")
    try:
        for study in studies:
            sent = storescu(first.port, *study.files)
            assert sent.returncode == 0, sent.stderr
        # Kill while a batch is claimed, after at least one batch finished (so deliveries are under way).
        wait_for(lambda: view.claimed() > 0 and view.instance_states().get("done", 0) >= BATCH, 60,
                 "a batch in flight after a finished one", logs=lambda: first.log, interval=0.02)
        first.stop(signal.SIGKILL)
        at_kill = view.instance_states()
        deliveries_at_kill = view.delivery_states()
        print(f"at kill -9: instances {dict(at_kill)}, deliveries {dict(deliveries_at_kill)}")
        assert at_kill.get("claimed", 0) > 0 and sum(at_kill.values()) == COUNT

        second = daemons(config, tmp_path / "gastrolens.toml")
        logs = lambda: f"--- killed ---\n{first.log}\n--- restarted ---\n{second.log}\n--- storescp ---\n{scp.log}"  # noqa: E731
        wait_for(lambda: view.everything_sent(COUNT, len(studies)), 120, "every output sent after the restart",
                 logs=logs)

        # Exactly one result per instance; the killed batch was claimed again after its lease expired.
        assert set(view.results_per_instance().values()) == {1}
        reclaimed = view.events(AuditEventType.INSTANCE_RECLAIMED)
        assert len(reclaimed) >= at_kill["claimed"]
        assert all(detail(e)["note"] == "lease expired" for e in reclaimed)
        assert len(view.events(AuditEventType.INSTANCE_DONE)) == COUNT

        # Exactly one delivery per output, sent; one `sent` event per delivery.
        outputs = {o.id: o for o in view.outputs()}
        deliveries = view.deliveries()
        assert sorted(d.output_id for d, _ in deliveries) == sorted(outputs)
        assert {d.state.value for d, _ in deliveries} == {"sent"}
        sent_events = [detail(e)["delivery_id"] for e in view.events(AuditEventType.DELIVERY_SENT)]
        assert sorted(sent_events) == sorted(d.id for d, _ in deliveries)

        # What storescp received: every output; a second copy only of an identical object.
        expected = {o.sop_instance_uid for o in outputs.values()}
        wait_for(lambda: len(scp.received()) >= len(expected), 10, "storescp to write every file", logs=logs)
        copies: dict[str, list] = defaultdict(list)
        for path in scp.received():
            copies[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID].append(path)
        assert set(copies) == expected
        doubled = {uid: paths for uid, paths in copies.items() if len(paths) > 1}
        print(f"storescp received {sum(map(len, copies.values()))} files for {len(expected)} outputs; "
              f"{len(doubled)} SOP instance(s) twice")
        for uid, paths in doubled.items():
            first_copy, *others = [pydicom.dcmread(p) for p in paths]
            for other in others:
                assert other == first_copy, f"two different objects arrived as {uid}"

        assert view.audit_intact()
        assert second.stop() == 0, second.log
    finally:
        view.close()
