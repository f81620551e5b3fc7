"""Query/Retrieve SCP, Study Root (C-FIND, C-MOVE, C-GET), over what a :class:`Catalog` holds.

The receiver registers :class:`QueryRetrieve` when it is given one; like the C-STORE
side it imports nothing from the database: the daemon hands it a catalog
(``gastrolens.daemon.query_retrieve``) that matches keys, locates files and audits.
Handlers never raise: a bad identifier gets its PS3.4 C.4 status (see
:mod:`~gastrolens.dicom_io.net.qr_identifier`), a catalog failure 0xA700 (transient) or
0xC000, and each request is audited once, whatever its outcome. A C-FIND that matches
more than ``[dicom] max_find_results`` is refused with 0xA700 before any answer goes
(C-FIND has no warning status to say that an answer was cut short).

C-MOVE sends only to the configured ``[[dicom.peers]]`` with ``move_destination``;
any other Move Destination is answered 0xA801. C-GET sends back over the requesting
association, for the storage SOP classes the requestor offered to receive (SCP role).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.presentation import PresentationContext, build_context

from gastrolens.config.schema import DicomSettings
from gastrolens.dicom_io.net.qr_identifier import (
    STATUS_UNABLE_TO_PROCESS,
    IdentifierError,
    Match,
    QueryKeys,
    answer,
    parse_identifier,
    unsupported_keys,
)
from gastrolens.dicom_io.net.services import requestor, status_dataset
from gastrolens.dicom_io.net.tls import client_tls_args
from gastrolens.errors import DatabaseError, StorageError

log = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
QUERY_RETRIEVE_SOP_CLASSES = (STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET)
UNCOMPRESSED = (str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian))
"""Proposed for each SOP class of a C-MOVE besides the files' own syntaxes (pydicom converts to them)."""

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7.4"
OUTPUT_SOP_CLASSES = (
    SEGMENTATION_STORAGE,
    COMPREHENSIVE_SR_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    MULTIFRAME_TRUE_COLOR_SC_STORAGE,
)
"""The SOP classes of what GastroLens writes (SEG, SR and study SR, overlays); a test checks the writers."""

STATUS_PENDING = 0xFF00
STATUS_PENDING_WARNING = 0xFF01
"""Pending (C-FIND): matches are continuing, one or more optional keys were not supported (PS3.4 C.4.1.1.4)."""
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
MAX_SUBOPERATIONS = 65535
"""Number of ... Sub-operations is US: a C-MOVE or C-GET sends at most this many objects."""
STATUS_SUBOPERATIONS_FAILED = 0xB000
"""Warning (C-MOVE, C-GET): some sub-operations failed or warned (pynetdicom lists them)."""
STATUS_TOO_MANY = 0xA702
"""Failure (C-MOVE, C-GET): out of resources, unable to perform sub-operations (more than 65535 objects,
or every sub-operation failed)."""
MAX_CONTEXTS = 128


@dataclass(frozen=True, kw_only=True)
class StoredObject:
    """A file GastroLens holds (a received instance or an output) that a retrieve sends."""

    path: Path
    sop_class_uid: str
    sop_uid: str


@dataclass(frozen=True, kw_only=True)
class QueryRecord:
    """One Q/R request as the audit trail records it."""

    service: str
    """C-FIND, C-MOVE or C-GET."""
    actor: str
    keys: QueryKeys | None
    status: int | None
    """What the peer was answered; None: nothing (the association ended first)."""
    rows: int = 0
    reason: str | None = None
    destination: str | None = None
    suboperations: tuple[int, int, int] | None = None
    """When a C-MOVE or C-GET has finished: C-STOREs completed, with warnings, failed."""


class Catalog(Protocol):
    """What the Q/R SCP asks the side that knows what is stored (the daemon's database)."""

    def find(self, keys: QueryKeys, *, limit: int | None = None) -> Sequence[Match]:
        """The matches for ``keys``, at ``keys.level``; at most ``limit`` of them when it is given."""
        ...

    def locate(self, keys: QueryKeys) -> Sequence[StoredObject]:
        """Every stored file at or below the entities ``keys`` names."""
        ...

    def record(self, record: QueryRecord) -> None:
        """Audit one request. Must not raise."""
        ...


class _Tally:
    """Counts the C-STORE-RSPs of a retrieve's sub-operations (pynetdicom keeps its own counts to itself)."""

    def __init__(self) -> None:
        self.handed = 0
        """Objects handed to pynetdicom so far."""
        self.completed = 0
        self.warning = 0

    def on_message(self, event: evt.Event) -> None:
        message = event.message
        if not isinstance(message, C_STORE_RSP) or message.command_set is None:
            return
        status = int(message.command_set.get("Status", STATUS_UNABLE_TO_PROCESS))
        if status == 0x0000:
            self.completed += 1
        elif status & 0xF000 == 0xB000:
            self.warning += 1


def _status_of(exc: Exception) -> int:
    transient = isinstance(exc, DatabaseError | StorageError | OSError | MemoryError)
    return STATUS_OUT_OF_RESOURCES if transient else STATUS_UNABLE_TO_PROCESS


def _actor(event: evt.Event) -> str:
    return requestor(event)[1]


class QueryRetrieve:
    """The C-FIND, C-MOVE and C-GET handlers and the presentation contexts they need."""

    def __init__(self, settings: DicomSettings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog

    sop_classes = QUERY_RETRIEVE_SOP_CLASSES
    """Accepted as SCP with pynetdicom's default transfer syntaxes (see ``dicom_io.net.services``)."""

    def add_storage_roles(self, ae: AE) -> None:
        """Storage contexts open to SCP/SCU role selection, so that C-GET can send back what it finds.

        Accepted SOP classes take both roles (stored here, sent back); output-only ones only
        the requestor's SCP role, so that nobody can C-STORE a SEG or an SR into the node.
        """
        for sop_class in self.settings.accepted_sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for sop_class in OUTPUT_SOP_CLASSES:
            if sop_class not in self.settings.accepted_sop_classes:
                ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES, scu_role=False, scp_role=True)

    def close(self) -> None:
        """Nothing runs in the background: each request is served in its association's thread."""

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move), (evt.EVT_C_GET, self.on_get)]

    # -- C-FIND ------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        actor, keys, sent = _actor(event), None, 0
        try:
            request = event.identifier
            keys = parse_identifier(request, retrieve=False)
            limit = self.settings.max_find_results
            matches = self.catalog.find(keys, limit=limit + 1)
            if len(matches) > limit:  # refused whole: a silently cut answer would end in Success
                reason = f"more than {limit} matches (max_find_results): narrow the query"
                self._record("C-FIND", actor, keys, STATUS_OUT_OF_RESOURCES, 0, reason)
                yield status_dataset(STATUS_OUT_OF_RESOURCES, reason), None
                return
            unsupported = unsupported_keys(request, keys.level)
            pending = STATUS_PENDING_WARNING if unsupported else STATUS_PENDING
            for match in matches:
                if event.is_cancelled:
                    self._record("C-FIND", actor, keys, STATUS_CANCEL, sent, "cancelled")
                    yield STATUS_CANCEL, None
                    return
                response = answer(match, keys, request, self.settings.ae_title)
                sent += 1
                yield pending, response
        except IdentifierError as exc:
            self._record("C-FIND", actor, keys, exc.status, 0, exc.reason)
            yield status_dataset(exc.status, exc.reason), None
            return
        except Exception as exc:  # the last-resort guard: answer and audit, never raise
            log.exception("C-FIND from %s failed", actor)
            status = _status_of(exc)
            self._record("C-FIND", actor, keys, status, sent, f"{exc.__class__.__name__}: {exc}")
            yield status_dataset(status, f"{exc.__class__.__name__}"), None
            return
        self._record("C-FIND", actor, keys, 0x0000, sent,
                     f"optional keys not supported: {', '.join(unsupported)}" if unsupported else None)

    # -- C-MOVE ------------------------------------------------------------------------

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        actor = _actor(event)
        destination = str(event.move_destination).strip()
        peer = self.settings.peer(destination)
        if peer is None or not peer.move_destination:
            reason = f"Move Destination {destination!r} is not a configured peer"
            self._record("C-MOVE", actor, None, STATUS_MOVE_DESTINATION_UNKNOWN, 0, reason, destination)
            yield None, None  # pynetdicom answers 0xA801, Move Destination unknown
            return
        keys, objects, problem = self._retrieval("C-MOVE", event, actor, destination)
        tally = _Tally()
        options: dict[str, Any] = {
            "contexts": _contexts(objects),
            "max_pdu": self.settings.max_pdu_bytes,
            "evt_handlers": [(evt.EVT_DIMSE_RECV, tally.on_message)],
        }
        tls_args = client_tls_args(peer.tls, peer.host)
        if tls_args is not None:
            options["tls_args"] = tls_args
        yield peer.host, peer.port, options
        if problem is not None:  # one failure response, after the destination pynetdicom requires first
            yield 1
            yield problem, None
            return
        finished = False
        try:
            yield len(objects)
            cancelled = yield from self._send(event, objects, tally)
            finished = True
        finally:  # pynetdicom drops the generator when the destination is unreachable or the association ends
            self._finished("C-MOVE", actor, keys, len(objects), tally, cancelled if finished else None, destination)

    # -- C-GET -------------------------------------------------------------------------

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        actor = _actor(event)
        keys, objects, problem = self._retrieval("C-GET", event, actor, None)
        if problem is not None:
            yield 1
            yield problem, None
            return
        yield len(objects)
        tally = _Tally()
        event.assoc.bind(evt.EVT_DIMSE_RECV, tally.on_message)  # the sub-operations' C-STORE-RSPs
        finished = False
        try:
            cancelled = yield from self._send(event, objects, tally)
            finished = True
        finally:  # pynetdicom drops the generator when the association ends
            event.assoc.unbind(evt.EVT_DIMSE_RECV, tally.on_message)
            self._finished("C-GET", actor, keys, len(objects), tally, cancelled if finished else None, None)

    # -- shared ------------------------------------------------------------------------

    def _retrieval(
        self, service: str, event: evt.Event, actor: str, destination: str | None
    ) -> tuple[QueryKeys | None, Sequence[StoredObject], Dataset | None]:
        """The objects to send, or the failure to answer; audited either way."""
        keys: QueryKeys | None = None
        try:
            keys = parse_identifier(event.identifier, retrieve=True)
            objects = self.catalog.locate(keys)
        except IdentifierError as exc:
            self._record(service, actor, keys, exc.status, 0, exc.reason, destination)
            return keys, (), status_dataset(exc.status, exc.reason)
        except Exception as exc:  # the last-resort guard: answer and audit, never raise
            log.exception("%s from %s failed", service, actor)
            status = _status_of(exc)
            self._record(service, actor, keys, status, 0, f"{exc.__class__.__name__}: {exc}", destination)
            return keys, (), status_dataset(status, exc.__class__.__name__)
        if len(objects) > MAX_SUBOPERATIONS:
            reason = f"{len(objects)} objects match; one request sends at most {MAX_SUBOPERATIONS}"
            self._record(service, actor, keys, STATUS_TOO_MANY, 0, reason, destination)
            return keys, (), status_dataset(STATUS_TOO_MANY, reason)
        self._record(service, actor, keys, STATUS_PENDING, len(objects), None, destination)
        return keys, objects, None

    def _send(self, event: evt.Event, objects: Sequence[StoredObject], tally: _Tally) -> Generator[Any, None, bool]:
        """Yield each object for a C-STORE sub-operation; True when the peer cancelled."""
        for stored in objects:
            tally.handed += 1
            if event.is_cancelled:
                yield STATUS_CANCEL, None
                return True
            try:
                dataset = dcmread(stored.path)
            except Exception as exc:  # a file gone or unreadable: that sub-operation fails, the rest go
                log.warning("cannot read %s for a retrieve: %s", stored.path, exc)
                missing = Dataset()
                missing.SOPInstanceUID = stored.sop_uid
                yield STATUS_PENDING, missing
                continue
            yield STATUS_PENDING, dataset
        return False

    def _finished(self, service: str, actor: str, keys: QueryKeys | None, total: int, tally: _Tally,
                  cancelled: bool | None, destination: str | None) -> None:
        """Audit what the sub-operations came to; ``cancelled`` None: pynetdicom stopped early."""
        failed = total - tally.completed - tally.warning
        reason = None
        status: int | None
        if cancelled is None:  # the peer never got a final response from us, or got pynetdicom's 0xA801
            unreachable = service == "C-MOVE" and tally.handed == 0
            status = STATUS_MOVE_DESTINATION_UNKNOWN if unreachable else None
            reason = ("the move destination could not be reached" if unreachable
                      else "the association ended before every sub-operation ran")
        elif cancelled:
            status = STATUS_CANCEL
        elif failed == 0 and tally.warning == 0:
            status = 0x0000
        else:
            status = STATUS_TOO_MANY if tally.completed + tally.warning == 0 else STATUS_SUBOPERATIONS_FAILED
        self._record(service, actor, keys, status, total, reason, destination,
                     suboperations=(tally.completed, tally.warning, failed))

    def _record(
        self,
        service: str,
        actor: str,
        keys: QueryKeys | None,
        status: int | None,
        rows: int,
        reason: str | None = None,
        destination: str | None = None,
        suboperations: tuple[int, int, int] | None = None,
    ) -> None:
        try:
            self.catalog.record(
                QueryRecord(
                    service=service,
                    actor=actor,
                    keys=keys,
                    status=status,
                    rows=rows,
                    reason=reason,
                    destination=destination,
                    suboperations=suboperations,
                )
            )
        except Exception:  # the catalog promises not to raise; the answer goes out regardless
            log.exception("could not audit a %s from %s", service, actor)


def _contexts(objects: Sequence[StoredObject]) -> list[PresentationContext]:
    """For a C-MOVE sub-association: each SOP class in each file's own syntax, then uncompressed."""
    pairs: dict[str, set[str]] = {}
    for stored in objects:
        syntax = str(ExplicitVRLittleEndian)
        try:
            syntax = str(read_file_meta_info(stored.path).TransferSyntaxUID)
        except Exception:  # unreadable here means a failed sub-operation later, not a missing context
            pass
        pairs.setdefault(stored.sop_class_uid, set()).add(syntax)
    contexts = [build_context(sop, [syntax]) for sop, syntaxes in sorted(pairs.items()) for syntax in sorted(syntaxes)]
    contexts += [build_context(sop, list(UNCOMPRESSED)) for sop in sorted(pairs)]
    if len(contexts) > MAX_CONTEXTS:
        log.warning("a C-MOVE needs %d presentation contexts: proposing the first %d", len(contexts), MAX_CONTEXTS)
    return contexts[:MAX_CONTEXTS] or [build_context(SECONDARY_CAPTURE_STORAGE, list(UNCOMPRESSED))]
