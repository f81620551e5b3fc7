"""What one attempt to send an output came to, in terms both senders and the database understand.

The senders (`dicom_io.net.send`, the folder copy in `daemon.destinations`) yield
:class:`SendResult` values and the delivery state machine (`db.transitions_delivery`)
turns each into the next state. It lives here, beside neither, so that `dicom_io` and
`db` never import each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SendOutcome(str, enum.Enum):
    """SENT: the destination has it. RETRY: worth another try later. PERMANENT: it never will."""

    SENT = "sent"
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True, kw_only=True)
class SendResult:
    """``status`` is what the peer answered: a C-STORE status (DICOM), an HTTP status or a
    STOW-RS Failure Reason (DICOMweb); None when it did not answer, or has no status (folder, HL7)."""

    outcome: SendOutcome
    status: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is SendOutcome.SENT


def sent(status: int | None = None) -> SendResult:
    return SendResult(outcome=SendOutcome.SENT, status=status)


def retry(reason: str, status: int | None = None) -> SendResult:
    return SendResult(outcome=SendOutcome.RETRY, status=status, reason=reason)


def permanent(reason: str, status: int | None = None) -> SendResult:
    return SendResult(outcome=SendOutcome.PERMANENT, status=status, reason=reason)


def describe_status(destination_kind: str | None, status: int | None) -> str | None:
    """A delivery's last status as its destination kind means it: ``0xA700`` (DICOM, or a
    STOW-RS Failure Reason, which are 0xA700 and up), ``HTTP 503`` (DICOMweb)."""
    if status is None or status < 0:
        return None
    if destination_kind == "dicomweb" and status < 600:
        return f"HTTP {status}"
    return f"0x{status:04X}"
