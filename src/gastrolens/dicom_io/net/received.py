"""What the receiver hands over, and what it gets back: the seam between network and storage.

The receiver speaks DICOM and nothing else. Whoever persists what arrives (the daemon
wires the store and the database, see ``gastrolens.daemon.ingest``) implements
:class:`Ingest`; the receiver imports nothing from the database, and tests can hand it
any object with these three methods.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
"""Failure: no room on disk, or the database could not commit; the peer may retry."""
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
"""Failure: a SOP class this node does not accept (C-STORE refuses it at negotiation)."""


class IngestResult(str, enum.Enum):
    """How a received data set ended; each one is audited by the ingest side."""

    STORED = "stored"
    """Durable: file fsync'd and renamed, row and audit event committed."""
    DUPLICATE = "duplicate"
    """Same bytes as an instance already stored: nothing new written."""
    QUARANTINED = "quarantined"
    """Not storable: the bytes are kept in quarantine with the reason."""
    REFUSED = "refused"
    """Not kept (no room, database down): the peer may send it again."""


@dataclass(frozen=True, kw_only=True)
class ReceivedInstance:
    """One data set as received (a C-STORE, or one part of a STOW-RS request), with who sent it."""

    data: bytes
    """The Part 10 bytes: preamble, file meta and the data set exactly as received."""
    actor: str
    """``dicom:<calling AE>@<address>``, as the audit trail names the peer."""
    calling_ae: str
    peer_address: str
    negotiated_sop_class: str | None
    requested_sop_uid: str | None
    """The Affected SOP Instance UID of the C-STORE request (the data set may disagree)."""
    expected_study_uid: str | None = None
    """The study the sender addressed (STOW-RS ``/studies/{study}``): a data set of another
    study is quarantined with 0xA900. None: any study (C-STORE)."""
    accepted_sop_classes: frozenset[str] | None = None
    """SOP classes this sender may store, where no negotiation took place (STOW-RS): any other
    is quarantined with 0x0122. None: the negotiated one decides (C-STORE)."""


@dataclass(frozen=True, kw_only=True)
class IngestOutcome:
    """The DICOM status the peer gets, and why."""

    status: int
    result: IngestResult
    reason: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    """The data set's UIDs when its header could be read (a STOW-RS response lists them)."""


class PeerEventKind(str, enum.Enum):
    """Things that happen to a connection before any data set arrives."""

    REJECTED = "rejected"
    """A-ASSOCIATE-RJ: access policy, or too many associations."""
    TLS_FAILED = "tls-failed"
    """The TLS handshake failed."""
    DROPPED = "dropped"
    """The connection ended before association negotiation completed (junk, silence)."""


@dataclass(frozen=True, kw_only=True)
class PeerEvent:
    kind: PeerEventKind
    actor: str
    reason: str


class Ingest(Protocol):
    """Persists what the receiver hands over. Implementations answer with a status of ours."""

    def ingest(self, received: ReceivedInstance) -> IngestOutcome:
        """Store ``received`` durably (or quarantine it, or refuse it) and audit the outcome."""
        ...

    def last_resort(
        self, received: ReceivedInstance | None, requested: RequestFacts, error: BaseException
    ) -> IngestOutcome:
        """Called when something nobody foresaw went wrong: keep the bytes when there are
        any, audit, answer. Must not raise."""
        ...

    def peer_event(self, event: PeerEvent) -> None:
        """Audit something that happened to a connection. Must not raise."""
        ...


@dataclass(frozen=True, kw_only=True)
class RequestFacts:
    """What is known about a C-STORE even when its data set could not be read."""

    actor: str
    calling_ae: str
    peer_address: str
    requested_sop_uid: str | None
