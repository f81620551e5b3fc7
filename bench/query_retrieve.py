"""Query/Retrieve benchmark: C-FIND and C-GET against the receiver, with DCMTK as the peer.

Stores ``--studies`` one-image studies and one ``--images``-image study (640x480 RGB
Secondary Capture, SQLite, fsync off) through the receiver's own ingest, starts the
receiver with the Q/R service as the daemon wires it, then times (median of
``--rounds``): a STUDY-level findscu that matches one study by a wildcard name, one that
matches every study, and a getscu of the big study. Wall time includes DCMTK's process
start and association. Prints figures; never a test.

    .venv/bin/python bench/query_retrieve.py [--studies 300] [--images 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

from gastrolens.config import Settings
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.daemon.query_retrieve import DatabaseCatalog
from gastrolens.db import Database
from gastrolens.dicom_io.net.query_retrieve import QueryRetrieve
from gastrolens.dicom_io.net.received import IngestResult, ReceivedInstance
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame
from gastrolens.storage.store import Store


def encoded(study_uid: str, patient: str, seed: int) -> bytes:
    frame, _ = endoscopy_frame(480, 640, None, seed=seed)
    buffer = io.BytesIO()
    as_dicom(frame, sop_class=SECONDARY_CAPTURE, study_uid=study_uid, patient_name=patient,
             patient_id=patient.split("^")[0]).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dcmtk(tool: str, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([f"/usr/bin/{tool}", *args], capture_output=True, timeout=600,
                          env={**os.environ, "TCP_NODELAY": "1"})
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings.model_validate({"storage": {"root": str(tmp / "storage"), "fsync": False},
                                            "database": {"url": f"sqlite:///{tmp / 'db.sqlite'}"},
                                            "dicom": {"port": 0}})
        db = Database(settings.database.url)
        db.upgrade()
        store = Store(settings.storage.root, fsync=False)
        ingest = DatabaseIngest(store, db, writers=2)
        big = generate_uid()
        work = [(generate_uid(), f"P{n:05d}^Patient", n) for n in range(args.studies)]
        work += [(big, "BIG^Study", 100_000 + i) for i in range(args.images)]
        for study_uid, patient, seed in work:
            outcome = ingest.ingest(ReceivedInstance(data=encoded(study_uid, patient, seed), actor="bench",
                                                     calling_ae="BENCH", peer_address="127.0.0.1",
                                                     negotiated_sop_class=None, requested_sop_uid=None))
            assert outcome.result is IngestResult.STORED, outcome
        receiver = Receiver(settings.dicom, ingest,
                            services=[QueryRetrieve(settings.dicom, DatabaseCatalog(db, store))])
        receiver.start()
        port = str(receiver.port)
        find = ["-S", "-aet", "BENCH", "-aec", "GASTROLENS", "-k", "QueryRetrieveLevel=STUDY",
                "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances"]
        try:
            one = [dcmtk("findscu", *find, "-k", "PatientName=BIG*", "127.0.0.1", port) for _ in range(args.rounds)]
            every = [dcmtk("findscu", *find, "-k", "PatientName=*", "127.0.0.1", port) for _ in range(args.rounds)]
            gets = []
            for r in range(args.rounds):
                out = tmp / f"get{r}"
                out.mkdir()
                gets.append(dcmtk("getscu", "-S", "-aet", "BENCH", "-aec", "GASTROLENS", "-od", str(out),
                                  "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={big}",
                                  "127.0.0.1", port))
                assert len(list(out.iterdir())) == args.images
        finally:
            receiver.stop(drain_seconds=5)
            ingest.close()
            db.dispose()
        size_mb = sum(p.stat().st_size for p in (tmp / "get0").iterdir()) / 2**20
    total = args.studies + 1
    print(f"C-FIND STUDY, wildcard name, 1 of {total} studies: {statistics.median(one) * 1000:.0f} ms")
    print(f"C-FIND STUDY, every one of {total} studies:       {statistics.median(every) * 1000:.0f} ms"
          f" ({statistics.median(every) / total * 1000:.2f} ms per answer)")
    get = statistics.median(gets)
    print(f"C-GET of a {args.images}-image study ({size_mb:.1f} MB):    {get * 1000:.0f} ms"
          f" ({args.images / get:.0f} images/s, {size_mb / get:.0f} MB/s)")


if __name__ == "__main__":
    main()
