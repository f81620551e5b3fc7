"""The C-STORE sender: one association per destination, a status per file.

This module only talks DICOM; the delivery stage decides what to retry.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from gastrolens.config.schema import Destination

log = logging.getLogger(__name__)

SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
"""Success, or a warning that still means the object was stored."""


@dataclass(frozen=True)
class SendResult:
    """``status`` is the peer's C-STORE status, None when no answer came (refused, timeout, abort)."""

    path: Path
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS_STATUSES

    @property
    def retryable(self) -> bool:
        """Worth another try: no answer, or out of resources (0xA7xx)."""
        return self.status is None or 0xA700 <= self.status <= 0xA7FF


def _client_tls(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    tls = destination.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    ctx.check_hostname = False  # PACS certificates rarely name the host the way DICOM peers are configured
    if tls.cert and tls.key:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx, destination.host or ""


def send_files(files: Sequence[tuple[Path, str]], destination: Destination, calling_ae: str,
               timeout_seconds: float = 30.0) -> Iterator[SendResult]:
    """C-STORE each ``(path, sop_class_uid)`` to ``destination`` over one association.

    Yields one result per file, in order, as soon as the peer answers, so the caller can
    record it before the next file goes (a crash then re-sends at most one file).
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    for sop_class in sorted({sop for _, sop in files})[:128]:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assert destination.host and destination.port and destination.ae_title
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=_client_tls(destination))
    except (OSError, ssl.SSLError) as exc:
        yield from (SendResult(path, None, f"cannot connect: {exc}") for path, _ in files)
        return
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
        yield from (SendResult(path, None, reason) for path, _ in files)
        return
    try:
        for index, (path, _) in enumerate(files):
            if not assoc.is_established:
                yield from (SendResult(p, None, "association lost") for p, _ in files[index:])
                return
            yield _send_one(assoc, path)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _send_one(assoc, path: Path) -> SendResult:  # type: ignore[no-untyped-def]
    try:
        status = assoc.send_c_store(dcmread(path))
    except FileNotFoundError as exc:
        return SendResult(path, -1, f"output file missing: {exc}")
    except ValueError as exc:  # no accepted presentation context: permanent for this peer
        return SendResult(path, -1, f"not accepted by the peer: {exc}")
    except (RuntimeError, OSError) as exc:
        return SendResult(path, None, f"send failed: {exc}")
    code = int(status.Status) if status and "Status" in status else None
    return SendResult(path, code, None if code in SUCCESS_STATUSES else _status_text(code))


def _status_text(code: int | None) -> str:
    return "no response (timeout or abort)" if code is None else f"peer answered 0x{code:04X}"
