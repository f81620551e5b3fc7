"""The C-STORE sender: one association per destination carries every object, one result per object.

Objects go as their files store them: pynetdicom is given the path and, with its
documented ``STORE_SEND_CHUNKED_DATASET`` option, streams the encoded data set from the
file instead of decoding it into a Dataset and encoding it again, so each file is read
once and never parsed. That needs a presentation context in the file's own transfer
syntax, so every SOP class is proposed once per syntax the writers store; a peer that
accepts none of them gets the object decoded and converted to Implicit VR Little Endian
(the only case that reads a file into a Dataset; a JPEG overlay is decompressed to RGB
then, still marked lossy).

This module only talks DICOM: it says what each attempt came to (sent, worth a retry,
permanent) and the delivery state machine decides the rest. The CPU time of pynetdicom's
own threads (the association's reactor and its DUL reader) is counted toward the
``deliver`` stage when the association ends, beside the caller's.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE
from pynetdicom.association import Association

from gastrolens import metrics
from gastrolens.config.schema import DicomPeer
from gastrolens.dicom_io.net.pynetdicom_private import no_delay, return_stolen_responses, send_files_as_stored
from gastrolens.dicom_io.net.tls import client_tls_args
from gastrolens.sending import SendResult, permanent, retry, sent

log = logging.getLogger(__name__)

SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
"""Success, or a warning that still means the object was stored."""

STORED_SYNTAXES = (ExplicitVRLittleEndian, JPEGBaseline8Bit)
"""The transfer syntaxes output files are stored in (see ``documents.common.save``); each is proposed as is."""

MAX_CONTEXTS = 128


def send_files(files: Sequence[tuple[Path, str]], peer: DicomPeer, calling_ae: str,
               timeout_seconds: float = 30.0) -> Iterator[SendResult]:
    """C-STORE each ``(path, sop_class_uid)`` to ``peer`` over one association.

    Yields one result per file, in order, as soon as the peer answers, so the caller can
    record it before the next file goes (a crash then re-sends at most one file). Closing
    the generator early releases the association.
    """
    if not files:
        return
    send_files_as_stored()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    for context in _contexts(sorted({sop for _, sop in files})):
        ae.add_requested_context(*context)
    try:
        tls_args = client_tls_args(peer.tls, peer.host)  # in the try: an unreadable key or CA is retried too
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as exc:
        yield from (retry(f"cannot connect: {exc}") for _ in files)
        return
    try:
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
            yield from (retry(reason) for _ in files)
            return
        return_stolen_responses(assoc)  # before no_delay makes responses fast enough to be stolen
        no_delay(assoc)  # else each object may wait for the peer's delayed ACK (40 ms)
        for index, (path, _) in enumerate(files):
            if not assoc.is_established:
                yield from (retry("association lost") for _ in files[index:])
                return
            yield _send_one(assoc, path)
    finally:
        helpers = threads_cpu_seconds(assoc, assoc.dul)  # read while they run: a thread's clock ends with it
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
        metrics.add_stage_cpu(metrics.Stage.DELIVER, helpers)


def threads_cpu_seconds(*threads: threading.Thread) -> float:
    """CPU seconds the given running threads have used so far (0 for one not running)."""
    total = 0.0
    for thread in threads:
        ident = thread.ident
        if ident is None or not thread.is_alive():  # an ended thread's id may be another's now
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(ident))
        except OSError:  # the thread has ended: its clock is gone
            continue
    return total


def _contexts(sop_classes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Each SOP class once per stored syntax, then once with Implicit VR Little Endian for conversion."""
    contexts = [(sop, [str(syntax)]) for sop in sop_classes for syntax in STORED_SYNTAXES]
    contexts += [(sop, [str(ImplicitVRLittleEndian)]) for sop in sop_classes]
    if len(contexts) > MAX_CONTEXTS:
        log.warning("%d SOP classes in one association: only the first %d presentation contexts are proposed",
                    len(sop_classes), MAX_CONTEXTS)
    return contexts[:MAX_CONTEXTS]


def _send_one(assoc: Association, path: Path) -> SendResult:
    try:
        try:
            status = assoc.send_c_store(path)  # the file's bytes as stored
        except ValueError:  # the peer accepted no context in the file's own syntax: convert
            status = assoc.send_c_store(_uncompressed(path))
    except FileNotFoundError as exc:
        return permanent(f"output file missing: {exc}")
    except (InvalidDicomError, AttributeError) as exc:
        return permanent(f"output file unreadable: {exc}")
    except ValueError as exc:  # no accepted presentation context at all: permanent for this peer
        return permanent(f"not accepted by the peer: {exc}")
    except (RuntimeError, OSError) as exc:
        return retry(f"send failed: {exc}")
    code = int(status.Status) if status and "Status" in status else None
    return classify(code)


def _uncompressed(path: Path) -> Dataset:
    """The file as a Dataset pynetdicom can convert to any uncompressed syntax."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:  # a JPEG overlay, to a peer that takes no JPEG
        ds.decompress()  # RGB, Explicit VR Little Endian; Lossy Image Compression stays 01
    return ds


def classify(code: int | None) -> SendResult:
    """A C-STORE status as an outcome: stored, worth another try, or refused for good."""
    if code in SUCCESS_STATUSES:
        return sent(code)
    if code is None:
        return retry("no response (timeout or abort)")
    if 0xA700 <= code <= 0xA7FF:  # out of resources
        return retry(f"peer answered 0x{code:04X} (out of resources)", code)
    return permanent(f"peer answered 0x{code:04X}", code)
