"""A workstation and a PACS as pynetdicom SCUs: MPPS data sets and storage commitment requests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlalchemy import select

from gastrolens.config.schema import DicomSettings
from gastrolens.daemon.dicom_services import dicom_services
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.db import Database
from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.dicom_io.net.services import (
    MODALITY_PERFORMED_PROCEDURE_STEP,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
)
from gastrolens.storage.store import Store


class Node:
    def __init__(self, receiver: Receiver, db: Database, store: Store, ingest: DatabaseIngest) -> None:
        self.receiver, self.db, self.store, self.ingest = receiver, db, store, ingest

    @property
    def port(self) -> int:
        return self.receiver.port

    def events(self, event_type: AuditEventType) -> list[AuditEvent]:
        with self.db.read_session() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)
                                        .order_by(AuditEvent.id)))


@pytest.fixture
def make_node(db_url: str, tmp_path: Path) -> Iterator[Callable[..., Node]]:
    from gastrolens.config import Settings

    nodes: list[Node] = []

    def make(**dicom: object) -> Node:
        db = Database(db_url)
        db.upgrade()
        store = Store(tmp_path / "storage", fsync=True, min_free_mb=0)
        ingest = DatabaseIngest(store, db)
        settings = Settings(dicom=DicomSettings(port=0, **dicom))  # type: ignore[arg-type]
        receiver = Receiver(settings.dicom, ingest, services=dicom_services(settings, db, store))
        receiver.start()
        nodes.append(Node(receiver, db, store, ingest))
        return nodes[-1]

    yield make
    for node in nodes:
        node.receiver.stop(drain_seconds=5)
        node.ingest.close()
        node.db.dispose()


def wait_events(node: Node, event_type: AuditEventType, timeout: float = 15) -> list[AuditEvent]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = node.events(event_type)
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"no {event_type.value} audit event within {timeout} s")


def mpps_create(study_uid: str, *, leave_out: Sequence[str] = (), status: str = "IN PROGRESS") -> Dataset:
    """An N-CREATE Attribute List as an endoscopy workstation sends it."""
    ds = Dataset()
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study_uid
    scheduled.AccessionNumber = "ACC1"
    scheduled.ScheduledProcedureStepID = "SPS1"
    scheduled.RequestedProcedureID = "RP1"
    ds.ScheduledStepAttributesSequence = [scheduled]
    ds.PatientName = "Test^Patient"
    ds.PatientID = "GL-MPPS-1"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "ENDO_WS1"
    ds.PerformedProcedureStepStartDate = "20261202"
    ds.PerformedProcedureStepStartTime = "010000"
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "ES"
    ds.PerformedSeriesSequence = []
    for keyword in leave_out:
        delattr(ds, keyword)
    return ds


def mpps_set(status: str, series: dict[str, list[tuple[str, str]]] | None = None) -> Dataset:
    """An N-SET Modification List: the final status and the images made, by series."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261202"
    ds.PerformedProcedureStepEndTime = "011500"
    items = []
    for series_uid, images in (series or {}).items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.PerformingPhysicianName = ""
        item.ProtocolName = "EGD"
        item.OperatorsName = ""
        item.SeriesDescription = ""
        item.RetrieveAETitle = ""
        item.ReferencedImageSequence = referenced_items(images)
        items.append(item)
    ds.PerformedSeriesSequence = items
    return ds


def referenced_items(pairs: Sequence[tuple[str, str]]) -> list[Dataset]:
    """Referenced SOP Class / Instance UID items, one per ``(sop_class, sop_uid)``."""
    items = []
    for sop_class, sop_uid in pairs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    return items


def workstation(port: int, ae_title: str = "ENDO_WS1") -> tuple[AE, Association]:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(MODALITY_PERFORMED_PROCEDURE_STEP)
    assoc = ae.associate("127.0.0.1", port, ae_title="GASTROLENS")
    assert assoc.is_established, "the MPPS association was refused"
    return ae, assoc


def status_of(response: Dataset) -> int:
    assert response is not None and "Status" in response, "no response"
    return int(response.Status)


def commitment_request(references: Sequence[tuple[str, str]]) -> tuple[str, Dataset]:
    transaction = generate_uid()
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = referenced_items(references)
    return transaction, ds


class ReportInbox:
    """Collects N-EVENT-REPORTs: bind :meth:`handle` to EVT_N_EVENT_REPORT (on an SCU association or a server)."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, Dataset, str]] = []
        self.arrived = threading.Event()

    def handle(self, event: evt.Event) -> tuple[int, None]:
        self.reports.append((int(event.event_type), event.event_information, event.assoc.requestor.ae_title.strip()
                             if not event.assoc.is_requestor else "same"))
        self.arrived.set()
        return 0x0000, None


def request_commitment(port: int, references: Sequence[tuple[str, str]], *, ae_title: str = "ENDO_WS1",
                       stay_open: bool = True, inbox: ReportInbox | None = None) -> tuple[str, int]:
    """Send one N-ACTION; with ``stay_open`` wait (10 s at most) for the report on the same association."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
    handlers = [(evt.EVT_N_EVENT_REPORT, inbox.handle)] if inbox else []
    assoc = ae.associate("127.0.0.1", port, ae_title="GASTROLENS", evt_handlers=handlers)
    assert assoc.is_established, "the storage commitment association was refused"
    try:
        transaction, info = commitment_request(references)
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH_MODEL, STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
        code = status_of(status)
        if stay_open and inbox is not None and code == 0:
            inbox.arrived.wait(10)
    finally:
        assoc.release()
        ae.shutdown()
    return transaction, code


def report_listener(ae_title: str = "ENDO_WS1") -> tuple[AE, ReportInbox, int]:
    """An SCP that takes storage commitment reports on new associations (GastroLens in the SCP role)."""
    from support import free_port

    inbox = ReportInbox()
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=True, scp_role=True)
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, inbox.handle)])
    return ae, inbox, port
