"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

A peer asks (N-ACTION, Action Type 1) whether GastroLens holds a list of instances; the
N-ACTION is answered at once and the result follows as an N-EVENT-REPORT: on the same
association while the peer keeps it open, else on a new association to the address
configured for the requester in ``[[dicom.peers]]`` (proposing the SCP role for the
SOP class, PS3.4 J.3.3). An instance is committed only when the daemon's
:class:`CommitmentBook` finds it held durably (row committed, file in the store), the
same promise C-STORE success makes; the others are listed as failed with a reason
(0x0112 no such object, 0x0119 class/instance conflict, 0x0110 processing failure).

Only configured peers with ``storage_commitment`` may ask (others get 0x0124). Every
request, refusal and report is audited through the book; nothing here imports the
database.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION

from gastrolens.config.schema import KnownPeer
from gastrolens.dicom_io.net.services import (
    STATUS_PROCESSING_FAILURE,
    STATUS_REFUSED_NOT_AUTHORISED,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE,
    requestor,
)
from gastrolens.dicom_io.net.tls import client_tls_args

log = logging.getLogger(__name__)

ACTION_REQUEST_COMMIT = 1
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2
STATUS_NO_SUCH_ACTION = 0x0123
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_INVALID_OBJECT_INSTANCE = 0x0117

SAME_ASSOCIATION_SECONDS = 5.0
"""How long the peer has to answer a report sent on its own association before a new one is tried."""
REPORT_ATTEMPTS = 3
"""Tries on a new association (1 s, then 2 s apart) before the report is given up, audited as failed."""


@dataclass(frozen=True, kw_only=True)
class CommitmentRequest:
    """One storage commitment request as received."""

    transaction_uid: str
    references: tuple[tuple[str, str], ...]
    """(Referenced SOP Class UID, Referenced SOP Instance UID), in the order asked."""
    actor: str
    calling_ae: str
    peer_address: str


@dataclass(frozen=True, kw_only=True)
class CommitmentReport:
    """What was reported, and how it went."""

    request: CommitmentRequest
    failures: Mapping[str, int]
    """SOP Instance UID -> Failure Reason, for the instances not committed."""
    via: str
    """``same-association``, ``new-association`` or ``none`` (could not be delivered)."""
    delivered: bool
    error: str | None = None


class CommitmentBook(Protocol):
    """The daemon's side: what is held, and the audit trail."""

    def failures(self, references: Sequence[tuple[str, str]]) -> dict[str, int]:
        """The instances not held durably, each with its Failure Reason; {} when all are held."""
        ...

    def requested(self, request: CommitmentRequest) -> None:
        """Audit an accepted request. Must not raise."""
        ...

    def refused(self, *, actor: str, reason: str, status: int, transaction_uid: str | None) -> None:
        """Audit a refused N-ACTION. Must not raise."""
        ...

    def reported(self, report: CommitmentReport) -> None:
        """Audit a report sent (or given up). Must not raise."""
        ...


class StorageCommitmentSCP:
    """The service: bind :meth:`handlers` on the receiver (see ``dicom_io.net.services``)."""

    sop_classes = (STORAGE_COMMITMENT_PUSH_MODEL,)

    def __init__(
        self,
        ae_title: str,
        peer: Callable[[str], KnownPeer | None],
        book: CommitmentBook,
        *,
        timeout_seconds: float = 30.0,
        retry_seconds: float = 1.0,
    ) -> None:
        self.ae_title = ae_title
        self.peer = peer
        self.book = book
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self._reports: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def handlers(self) -> Sequence[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_N_ACTION, self.on_action)]

    def close(self, wait_seconds: float = 10.0) -> None:
        self._closing.set()
        deadline = time.monotonic() + wait_seconds
        with self._lock:
            threads = list(self._reports)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- N-ACTION ----------------------------------------------------------------------

    def on_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """Answer the N-ACTION; the N-EVENT-REPORT follows from a thread of its own."""
        assoc = event.assoc
        calling_ae, actor = requestor(event)
        try:
            return self._on_action(event, assoc, calling_ae, actor)
        except Exception as exc:  # the last-resort guard: answer and audit, never raise
            log.exception("unexpected error handling a storage commitment request from %s", actor)
            self.book.refused(actor=actor, reason=f"internal error: {exc.__class__.__name__}: {exc}",
                              status=STATUS_PROCESSING_FAILURE, transaction_uid=None)
            return STATUS_PROCESSING_FAILURE, None

    def _on_action(self, event: evt.Event, assoc: Association, calling_ae: str,
                   actor: str) -> tuple[int, Dataset | None]:
        def refuse(status: int, reason: str, transaction_uid: str | None = None) -> tuple[int, Dataset | None]:
            log.warning("storage commitment request from %s refused (0x%04X): %s", actor, status, reason)
            self.book.refused(actor=actor, reason=reason, status=status, transaction_uid=transaction_uid)
            return status, None

        peer = self.peer(calling_ae)
        if peer is None or not peer.storage_commitment:
            return refuse(STATUS_REFUSED_NOT_AUTHORISED,
                          f"calling AE title {calling_ae!r} is not a [[dicom.peers]] entry allowed to ask "
                          "for storage commitment")
        if event.action_type != ACTION_REQUEST_COMMIT:
            return refuse(STATUS_NO_SUCH_ACTION, f"action type {event.action_type} is not 1 (request commitment)")
        instance = str(cast(N_ACTION, event.request).RequestedSOPInstanceUID or "")
        if instance != STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE:
            return refuse(STATUS_INVALID_OBJECT_INSTANCE,
                          f"requested SOP instance {instance!r} is not {STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE}")
        try:
            info = event.action_information
            transaction_uid = str(info.get("TransactionUID", "") or "")
            references = tuple(
                (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                for item in info.get("ReferencedSOPSequence", [])
            )
        except (AttributeError, ValueError, TypeError, KeyError) as exc:
            return refuse(STATUS_INVALID_ARGUMENT, f"action information cannot be read: {exc}")
        if not transaction_uid:
            return refuse(STATUS_INVALID_ARGUMENT, "Transaction UID (0008,1195) is missing")
        if not references:
            return refuse(STATUS_INVALID_ARGUMENT, "Referenced SOP Sequence (0008,1199) is missing or empty",
                          transaction_uid)
        request = CommitmentRequest(transaction_uid=transaction_uid, references=references, actor=actor,
                                    calling_ae=calling_ae, peer_address=assoc.requestor.address)
        self.book.requested(request)
        log.info("storage commitment request %s from %s: %d instance(s)", transaction_uid, actor, len(references))
        thread = threading.Thread(target=self._report, args=(request, assoc, peer),
                                  name="gastrolens-commitment-report", daemon=True)
        with self._lock:
            self._reports = [t for t in self._reports if t.is_alive()]
            self._reports.append(thread)
        thread.start()  # send_n_event_report waits until the N-ACTION response is out
        return 0x0000, None

    # -- N-EVENT-REPORT ----------------------------------------------------------------

    def _report(self, request: CommitmentRequest, assoc: Association, peer: KnownPeer) -> None:
        try:
            try:
                failures = self.book.failures(request.references)
            except Exception as exc:  # the database is down or worse: nothing can be promised
                log.error("storage commitment %s: cannot check what is held: %s", request.transaction_uid, exc)
                failures = {uid: STATUS_PROCESSING_FAILURE for _, uid in request.references}
            info = event_information(request, failures, self.ae_title)
            event_type = EVENT_SOME_FAILED if failures else EVENT_ALL_COMMITTED
            report = self._send(request, info, event_type, failures, assoc, peer)
        except Exception as exc:  # a report thread never dies silently
            log.exception("storage commitment %s: report failed", request.transaction_uid)
            report = CommitmentReport(request=request, failures={}, via="none", delivered=False,
                                      error=f"{exc.__class__.__name__}: {exc}")
        self.book.reported(report)

    def _send(self, request: CommitmentRequest, info: Dataset, event_type: int, failures: Mapping[str, int],
              assoc: Association, peer: KnownPeer) -> CommitmentReport:
        errors: list[str] = []
        if assoc.is_established and not assoc.acse.is_release_requested():
            # A peer releasing at this moment waits for our A-RELEASE-RP while we wait for its
            # N-EVENT-REPORT-RSP (the reactor is paused while we send): bound that wait, then
            # fall back to a new association.
            timeout = assoc.dimse_timeout
            assoc.dimse_timeout = min(timeout or SAME_ASSOCIATION_SECONDS, SAME_ASSOCIATION_SECONDS)
            try:
                error = _send_on(assoc, info, event_type)
            finally:
                assoc.dimse_timeout = timeout
            if error is None:
                return CommitmentReport(request=request, failures=failures, via="same-association", delivered=True)
            errors.append(f"same association: {error}")
        for attempt in range(REPORT_ATTEMPTS):
            if attempt and self._closing.wait(self.retry_seconds * 2 ** (attempt - 1)):
                break  # the receiver is stopping
            error = self._send_new(info, event_type, peer)
            if error is None:
                return CommitmentReport(request=request, failures=failures, via="new-association", delivered=True,
                                        error="; ".join(errors) or None)
            errors.append(f"{peer.ae_title}@{peer.host}:{peer.port}: {error}")
        log.error("storage commitment %s: report not delivered: %s", request.transaction_uid, "; ".join(errors))
        return CommitmentReport(request=request, failures=failures, via="none", delivered=False,
                                error="; ".join(errors))

    def _send_new(self, info: Dataset, event_type: int, peer: KnownPeer) -> str | None:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_seconds
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
        role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scu_role=False, scp_role=True)
        try:
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role],
                                 tls_args=client_tls_args(peer.tls, peer.host))
        except (OSError, ssl.SSLError) as exc:
            ae.shutdown()
            return f"cannot connect: {exc}"
        try:
            if not assoc.is_established:
                return "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
            return _send_on(assoc, info, event_type)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()


def _send_on(assoc: Association, info: Dataset, event_type: int) -> str | None:
    """Send the report on ``assoc``; None when the peer answered success, else why not."""
    try:
        status, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT_PUSH_MODEL,
                                              STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE)
    except (RuntimeError, ValueError, OSError) as exc:  # no context, association gone
        return f"{exc.__class__.__name__}: {exc}"
    if not status or "Status" not in status:
        return "no response (timeout or abort)"
    if int(status.Status) != 0x0000:
        return f"peer answered 0x{int(status.Status):04X}"
    return None


def event_information(request: CommitmentRequest, failures: Mapping[str, int], retrieve_ae: str) -> Dataset:
    """The N-EVENT-REPORT Event Information (PS3.4 Table J.3-2)."""
    info = Dataset()
    info.TransactionUID = request.transaction_uid
    committed, failed = [], []
    for sop_class, sop_uid in request.references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        if sop_uid in failures:
            item.FailureReason = failures[sop_uid]
            failed.append(item)
        else:
            committed.append(item)
    if committed:
        info.RetrieveAETitle = retrieve_ae
        info.ReferencedSOPSequence = committed
    if failed:
        info.FailedSOPSequence = failed
    return info

