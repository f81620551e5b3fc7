"""STOW-RS receiving benchmark: N 640x480 JPEG-baseline Secondary Capture instances in one request.

The API runs under uvicorn on a real socket (a thread of this process, as in the daemon)
with the C-STORE ingest behind it: SQLite, fsync on, storage in a temporary folder. Prints
instances/s and MB/s for one STOW-RS request (its parts go through the ingest
PARALLEL_PARTS at a time), and for the same instances handed straight to the ingest one
after the other (no HTTP, no multipart: what one C-STORE association does).
Checks that every instance was stored. Prints figures; never a test.

    .venv/bin/python bench/stow.py [--count 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from gastrolens.api.auth import hash_token
from gastrolens.api.server import ApiServer
from gastrolens.config import Settings
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.db import Database
from gastrolens.dicom_io.net.received import IngestResult, ReceivedInstance
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame
from gastrolens.storage.store import Store

TOKEN = "bench-sender-token-0123456789abcdef"


def instances(count: int) -> list[bytes]:
    frame, _ = endoscopy_frame(480, 640, None, seed=1)
    study = generate_uid()
    made = []
    for n in range(count):
        ds = as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=study, instance_number=n + 1, jpeg_quality=90)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        made.append(buffer.getvalue())
    return made


def body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), p) for p in parts]
    return b"".join(chunks) + b"--%s--\r\n" % boundary.encode(), boundary


def one_round(folder: Path, parts: list[bytes]) -> tuple[float, float]:
    """Seconds for one STOW-RS request of ``parts``, and for the same parts straight into the ingest."""
    url = f"sqlite:///{folder / 'gastrolens.db'}"
    settings = Settings.model_validate({
        "database": {"url": url}, "storage": {"root": str(folder / "storage"), "min_free_mb": 1},
        "api": {"enabled": True, "port": 0, "tokens": [{"name": "bench", "role": "sender",
                                                         "sha256": hash_token(TOKEN)}]},
    })
    db = Database(url)
    db.upgrade()
    store = Store(folder / "storage", fsync=True, min_free_mb=1)
    ingest = DatabaseIngest(store, db, write_lock=threading.Lock())
    server = ApiServer(settings, db, store_root=folder / "storage", ingest=ingest)
    server.start()
    try:
        content, boundary = body(parts)
        started = time.perf_counter()
        answer = httpx.post(f"{server.url}/dicomweb/studies", content=content, timeout=600, headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        web = time.perf_counter() - started
        stored = answer.json().get("00081199", {}).get("Value", [])
        if answer.status_code != 200 or len(stored) != len(parts):
            sys.exit(f"STOW-RS answered {answer.status_code} with {len(stored)} of {len(parts)} stored")
        fresh = [p.replace(b"1.2.826.0.1.3680043.8.498.", b"1.2.826.0.1.3680043.8.499.") for p in parts]
        started = time.perf_counter()
        for data in fresh:  # new UIDs (same length), so nothing is a duplicate
            outcome = ingest.ingest(ReceivedInstance(data=data, actor="bench", calling_ae="BENCH", peer_address="",
                                                     negotiated_sop_class=None, requested_sop_uid=None))
            if outcome.result is not IngestResult.STORED:
                sys.exit(f"the ingest answered {outcome}")
        direct = time.perf_counter() - started
        return web, direct
    finally:
        server.stop()
        ingest.close()
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    parts = instances(args.count)
    megabytes = sum(len(p) for p in parts) / 1e6
    print(f"{args.count} instances, 640x480 JPEG baseline SC, {megabytes:.1f} MB in one request; "
          f"SQLite, fsync on; {args.rounds} round(s), median")
    webs, directs = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="gl-stow-bench-") as folder:
            web, direct = one_round(Path(folder), parts)
        webs.append(web)
        directs.append(direct)
    web, direct = statistics.median(webs), statistics.median(directs)
    print(f"STOW-RS request     {args.count / web:7.1f} instances/s  {megabytes / web:6.1f} MB/s  ({web:.2f} s)")
    print(f"ingest, one by one  {args.count / direct:7.1f} instances/s  {megabytes / direct:6.1f} MB/s  "
          f"({direct:.2f} s)")


if __name__ == "__main__":
    main()
