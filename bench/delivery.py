"""Delivery benchmark: CPU time per object of the delivery step, as the daemon runs it.

Builds the real outputs (SEG, image SR, overlay) of N/3 synthetic 640x480 images once,
records them with one pending delivery each, and runs :class:`DeliveryStep` against

  * DCMTK storescp (a separate process: its CPU is not counted), objects sent as stored
    (the daemon's way), and again with pynetdicom decoding each file and encoding it
    anew (the way before: ``dcmread`` + send the Dataset), for comparison;
  * a folder destination (atomic copy).

For each it prints the process CPU time per object (every thread of this process:
the caller, pynetdicom's association thread, the database), of which the database part
(claim, one transaction per object recording the peer's answer), and objects/s.
Prints figures; never a test.

The DICOM peer runs are made with ``--associations`` (default: 1, the default of
``[[destinations]] associations``, 2 and 4; storescp then runs with --fork, as it
otherwise serves one association at a time), each printed on its own line.

    .venv/bin/python bench/delivery.py [--count 150] [--fsync] [--associations 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STORESCP = "/usr/bin/storescp"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=150, help="objects to deliver per run (default 150)")
    parser.add_argument("--fsync", action="store_true", help="fsync the folder copies (default: off; the SQLite "
                        "database always syncs, as the daemon's does)")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 2, 4],
                        help="associations to the DICOM peer at once, one run per value (default: 1 2 4)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gastrolens-bench-delivery-"))
    try:
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        sources = max(1, args.count // 3)
        started = time.perf_counter()
        outputs = build_outputs(work / "storage", sources)
        sizes = [p.stat().st_size for p, *_ in outputs]
        print(f"built {len(outputs)} outputs from {sources} images in {time.perf_counter() - started:.1f} s, "
              f"{sum(sizes) / len(sizes) / 1024:.0f} KiB per object on average")
        runs = [(f"DICOM peer, as stored, {n} assoc.", "stored", n) for n in args.associations]
        runs += [("DICOM peer, decoded + encoded, 1 assoc.", "decoded", 1), ("folder", "folder", 1)]
        for label, mode, associations in runs:
            run(work, outputs, label, mode, fsync=args.fsync, associations=associations)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def build_outputs(root: Path, sources: int) -> list[tuple[Path, str, str, str, str]]:
    """(path, sop_class, sop_uid, series_uid, kind) of every output of ``sources`` synthetic images."""
    from pydicom.uid import generate_uid

    from gastrolens.dicom_io.documents.outputs import write_outputs
    from gastrolens.findings import CLASS_ORDER, ImageFinding, LesionClass, ModelIdentity
    from gastrolens.samples import VL_ENDOSCOPIC, as_dicom, endoscopy_frame

    model = ModelIdentity("bench", "1", "b" * 64, untrained=True)
    study = generate_uid()
    written = []
    for i in range(sources):
        frame, mask = endoscopy_frame(480, 640, LesionClass.PU, seed=i)
        ds = as_dicom(frame, sop_class=VL_ENDOSCOPIC, study_uid=study, jpeg_quality=90)
        probabilities = tuple(0.6 if c is LesionClass.PU else 0.1 for c in CLASS_ORDER)
        rows, cols = np.nonzero(mask)
        finding = ImageFinding(probabilities=probabilities, predicted=LesionClass.PU, lesion_present=True, mask=mask,
                               lesion_area_fraction=float(mask.mean()),
                               bbox=(int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1),
                               model=model)
        for out in write_outputs(ds, [finding], root / "outputs" / study, frames=[frame], fsync=False):
            written.append((out.path, out.sop_class_uid, out.sop_instance_uid, out.series_instance_uid, out.kind.value))
    return written


def run(work: Path, outputs: list[tuple[Path, str, str, str, str]], label: str, mode: str, *, fsync: bool,
        associations: int = 1) -> None:
    from pynetdicom import _config
    from sqlalchemy import func, select

    import gastrolens.dicom_io.net.send as send_module
    from gastrolens.config import Settings
    from gastrolens.daemon.delivery import DeliveryStep
    from gastrolens.db import Database
    from gastrolens.db.states import DeliveryState
    from gastrolens.db.tables import Delivery
    from gastrolens.storage.store import Store

    folder = work / f"peer-{mode}-{associations}"
    folder.mkdir()
    db_url = f"sqlite:///{work / f'{mode}-{associations}.db'}"
    destination: dict[str, object]
    peer = None
    if mode == "folder":
        destination = {"name": "dest", "folder": str(folder)}
    else:
        port = free_port()
        fork = ["--fork"] if associations > 1 else []  # else storescp serves one association at a time
        peer = subprocess.Popen([STORESCP, "+xa", *fork, "-aet", "PEER", "-od", str(folder), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "TCP_NODELAY": "1"})
        wait_for_port(port)
        destination = {"name": "dest", "ae_title": "PEER", "host": "127.0.0.1", "port": port,
                       "associations": associations}
    settings = Settings.model_validate({"storage": {"root": str(work / "storage"), "fsync": fsync},
                                        "database": {"url": db_url}, "destinations": [destination]})
    db = Database(db_url)
    db.upgrade()
    store = Store(settings.storage.root, fsync=fsync)
    seed_deliveries(db, store, outputs)
    as_stored = send_module.send_files_as_stored
    if mode == "decoded":  # the way before: pynetdicom decodes the file and encodes the Dataset again
        send_module.send_files_as_stored = lambda: setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)  # type: ignore[assignment]
    step = DeliveryStep(settings, db, store, "bench")
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        attempts = step.run_once()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        send_module.send_files_as_stored = as_stored  # type: ignore[assignment]
        if peer is not None:
            peer.terminate()
            peer.wait(timeout=10)
    with db.session() as s:
        sent = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state == DeliveryState.SENT))
    db_cpu = database_cpu(db, len(outputs))
    db.dispose()
    print(f"{label:40s} {attempts} attempts, {sent} sent; {cpu / attempts * 1000:6.2f} CPU-ms per object "
          f"(database about {db_cpu * 1000:.2f}), {attempts / wall:7.1f} objects/s")


def seed_deliveries(db, store, outputs) -> None:  # type: ignore[no-untyped-def]
    from gastrolens.db.tables import Delivery, Instance, Output, Series, Study, utcnow
    from gastrolens.findings import OutputKind

    with db.session() as s:
        study = Study(study_instance_uid="1.2.3.999")
        s.add(study)
        s.flush()
        series = Series(series_instance_uid="1.2.3.999.1", study_id=study.id)
        s.add(series)
        s.flush()
        instance = Instance(sop_instance_uid="1.2.3.999.1.1", series_id=series.id, study_id=study.id,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.1",
                            transfer_syntax_uid="1.2.840.10008.1.2.4.50",
                            file_path="in.dcm", sha256="0" * 64, size_bytes=1)
        s.add(instance)
        s.flush()
        now = utcnow()
        for path, sop_class, sop_uid, series_uid, kind in outputs:
            out = Output(kind=OutputKind(kind), study_id=study.id, instance_id=instance.id, sop_instance_uid=sop_uid,
                         series_instance_uid=series_uid, sop_class_uid=sop_class, file_path=store.relative(path),
                         model_sha256="b" * 64)
            s.add(out)
            s.flush()
            s.add(Delivery(output_id=out.id, destination="dest", attempts=0, next_attempt_at=now))


def database_cpu(db, count: int) -> float:  # type: ignore[no-untyped-def]
    """CPU seconds per object of the database work alone: a claim of ``count``, then the
    results recorded as delivery records them (RECORD_GROUP per transaction)."""
    from sqlalchemy import update

    from gastrolens.daemon.delivery import RECORD_GROUP
    from gastrolens.db.queue import claim_deliveries
    from gastrolens.db.states import DeliveryState
    from gastrolens.db.tables import Delivery, utcnow
    from gastrolens.db.transitions_delivery import RetryPolicy, record_delivery_attempts
    from gastrolens.sending import sent

    with db.session() as s:
        s.execute(update(Delivery).values(state=DeliveryState.PENDING, claimed_by=None, lease_expires_at=None))
    policy = RetryPolicy(max_attempts=3, backoff_seconds=1, max_backoff_seconds=1)
    cpu = time.process_time()
    with db.session() as s:
        claims = claim_deliveries(s, "db", limit=count, lease_seconds=60, now=utcnow())
    for start in range(0, len(claims), RECORD_GROUP):
        with db.session() as s:
            record_delivery_attempts(s, [(claim, sent(0), utcnow()) for claim in claims[start:start + RECORD_GROUP]],
                                     worker="db", policy=policy)
    return (time.process_time() - cpu) / max(1, len(claims))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"storescp did not listen on {port}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
