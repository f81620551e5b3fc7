"""DICOM services beside C-STORE and C-ECHO, plugged into the :class:`~gastrolens.dicom_io.net.receiver.Receiver`.

A service says which SOP classes it serves (as SCP) and which pynetdicom events it
handles; the receiver adds its presentation contexts and binds its handlers, and
applies the same association policy (allowed calling AEs, allowed peers, the node's
association limit) to every service. Like the C-STORE handler, service handlers never
raise: each answers a status of ours and has its outcome audited by the object the
daemon handed it (it imports nothing from the database).

The SOP classes served are constants here, for the conformance statement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import evt

STORAGE_COMMITMENT_PUSH_MODEL = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class (PS3.4 Annex J), served as SCP."""
STORAGE_COMMITMENT_PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance UID."""
MODALITY_PERFORMED_PROCEDURE_STEP = "1.2.840.10008.3.1.2.3.3"
"""Modality Performed Procedure Step SOP Class (PS3.4 Annex F), served as SCP (N-CREATE, N-SET)."""

SERVICE_SOP_CLASSES = (STORAGE_COMMITMENT_PUSH_MODEL, MODALITY_PERFORMED_PROCEDURE_STEP)
"""Every non-storage SOP class these services accept as SCP (with the default uncompressed transfer syntaxes)."""

STATUS_REFUSED_NOT_AUTHORISED = 0x0124
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_OBJECT = 0x0112
STATUS_CLASS_INSTANCE_CONFLICT = 0x0119


class DicomService(Protocol):
    """One DICOM service the receiver serves beside storage."""

    @property
    def sop_classes(self) -> Sequence[str]:
        """Abstract syntaxes accepted as SCP, each with pynetdicom's default transfer syntaxes."""
        ...

    def handlers(self) -> Sequence[tuple[Any, Callable[..., Any]]]:
        """``(evt.EVT_..., handler)`` pairs to bind on the server."""
        ...

    def close(self) -> None:
        """Stop background work (reports still being sent get a bounded wait)."""
        ...


def requestor(event: evt.Event) -> tuple[str, str]:
    """The calling AE title (without its padding) and the audit actor, ``dicom:<AE>@<address>``."""
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    return calling_ae, f"dicom:{calling_ae}@{event.assoc.requestor.address}"


def status_dataset(code: int, comment: str, error_id: int | None = None) -> Dataset:
    """A response status with its Error Comment (LO: cut to 64 characters) and, if given, Error ID."""
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    if error_id is not None:
        status.ErrorID = error_id
    return status
