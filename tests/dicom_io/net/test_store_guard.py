"""Every C-STORE path answers a status of ours and writes its audit event, even the unforeseen ones.

Before the ingest seam, ``has_room()`` sat outside the handler's try: an OSError there
became pynetdicom's 0xC211 with no audit row.
"""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import func, select

from gastrolens.config.schema import DicomSettings
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.db import Database
from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent, Instance, Quarantined
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.findings import LesionClass
from gastrolens.samples import SECONDARY_CAPTURE, as_dicom, endoscopy_frame
from gastrolens.storage.store import Store

SC = "1.2.840.10008.5.1.4.1.1.7"


class DiskGone(Store):
    """The storage root vanished under the daemon (an unmounted share)."""

    def has_room(self) -> bool:
        raise FileNotFoundError(2, "No such file or directory", str(self.root))


class BuggyPaths(Store):
    """A bug nobody foresaw, raised in the middle of persisting."""

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str, version: int) -> str:
        raise RuntimeError("a bug nobody foresaw")


def c_store(port: int, path: Path) -> int:
    ae = AE(ae_title="ENDO_WS1")
    ae.add_requested_context(SC, [str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="GASTROLENS")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    frame, _ = endoscopy_frame(32, 40, LesionClass.PU)
    path = tmp_path / "sc.dcm"
    as_dicom(frame, sop_class=SECONDARY_CAPTURE).save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def serve(db_url: str, tmp_path: Path):
    running: list[tuple[Receiver, DatabaseIngest, Database]] = []

    def start(store_class: type[Store]) -> tuple[Receiver, Database, Store]:
        db = Database(db_url)
        db.upgrade()
        store = store_class(tmp_path / "storage", fsync=True)
        ingest = DatabaseIngest(store, db)
        receiver = Receiver(DicomSettings(port=0), ingest)
        receiver.start()
        running.append((receiver, ingest, db))
        return receiver, db, store

    yield start
    for receiver, ingest, db in running:
        receiver.stop(drain_seconds=5)
        ingest.close()
        db.dispose()


def audit_events(db: Database, kind: AuditEventType) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_type == kind)))


def test_free_space_check_that_fails_answers_out_of_resources_and_is_audited(serve, instance):
    receiver, db, _ = serve(DiskGone)
    assert c_store(receiver.port, instance) == 0xA700
    refused = audit_events(db, AuditEventType.STORE_REFUSED)
    assert len(refused) == 1
    assert "free space" in refused[0].detail and refused[0].sop_uid == str(dcmread(instance).SOPInstanceUID)


def test_unforeseen_error_is_answered_quarantined_and_audited(serve, instance):
    receiver, db, store = serve(BuggyPaths)
    assert c_store(receiver.port, instance) == 0xC000
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
        kept = s.scalars(select(Quarantined)).one()
    assert "a bug nobody foresaw" in kept.reason and kept.status == 0xC000
    data = store.absolute(kept.file_path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == kept.sha256
    assert dcmread(BytesIO(data)).SOPInstanceUID == dcmread(instance).SOPInstanceUID
    quarantined = audit_events(db, AuditEventType.INSTANCE_QUARANTINED)
    assert len(quarantined) == 1 and "internal error" in quarantined[0].detail


def test_the_receiver_needs_no_database(tmp_path, instance):
    """The seam: any object with the three Ingest methods will do; the receiver imports no db."""
    from gastrolens.dicom_io.net.received import IngestOutcome, IngestResult

    class Counting:
        def __init__(self) -> None:
            self.received: list[bytes] = []

        def ingest(self, received):  # type: ignore[no-untyped-def]
            self.received.append(received.data)
            return IngestOutcome(status=0xB000, result=IngestResult.STORED)

        def last_resort(self, received, requested, error):  # type: ignore[no-untyped-def]
            raise AssertionError(f"not expected: {error!r}")

        def peer_event(self, event):  # type: ignore[no-untyped-def]
            pass

    ingest = Counting()
    receiver = Receiver(DicomSettings(port=0), ingest)
    receiver.start()
    try:
        assert c_store(receiver.port, instance) == 0xB000
    finally:
        receiver.stop(drain_seconds=5)
    assert (
        len(ingest.received) == 1
        and dcmread(BytesIO(ingest.received[0])).SOPInstanceUID == dcmread(instance).SOPInstanceUID
    )
