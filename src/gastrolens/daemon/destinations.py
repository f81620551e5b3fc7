"""One sender per kind of destination, each with one ``send`` that yields a typed result per object.

The configuration says what a destination is (:class:`~gastrolens.config.schema.DicomPeer`,
:class:`~gastrolens.config.schema.Folder`, :class:`~gastrolens.config.schema.DicomWeb`
or :class:`~gastrolens.config.schema.HL7`); :func:`sender_for` gives the code that
sends to it. ``send`` takes every object due for that destination at once (one
association for a DICOM peer) and yields one :class:`~gastrolens.sending.SendResult`
per object, in order, as each is done, so delivery records each before the next goes.
A new kind of destination is a new config model in the union plus a case here.

An HL7 destination is different in what it takes, not in how it is queued: it receives
one result message per study conclusion, not the DICOM objects. Rather than a queue of
its own, it gets an ordinary delivery row for each study SR output (and none for SEG,
per-image SR or overlay: :func:`object_destination_names` leaves it out of those), and
its sender builds the ORU^R01 from that SR file. So an HL7 result has exactly the
claim, backoff, ``dead``, requeue, per-attempt audit and ``gastrolens deliveries`` view
of every other delivery; a new SR revision is a new output, hence a new delivery, sent
as a corrected result; and the message says what the DICOM SR says, because it is read
from it (:mod:`gastrolens.dicom_io.documents.study_sr_read`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, assert_never

from gastrolens.config import Settings
from gastrolens.config.schema import HL7, DicomPeer, DicomWeb, Folder
from gastrolens.dicom_io.documents.study_sr_read import read_study_report
from gastrolens.dicom_io.net.send import send_files
from gastrolens.dicom_io.net.stow import StowObject, stow_files
from gastrolens.errors import OutputError
from gastrolens.findings import OutputKind
from gastrolens.hl7v2.mllp import UNREACHABLE, send_message
from gastrolens.hl7v2.oru import build_oru
from gastrolens.sending import SendResult, permanent, retry, sent
from gastrolens.storage.atomic import write_atomic


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One stored output to send."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    kind: OutputKind | None = None
    """What the output is; None when not known (a sender that needs it refuses the object)."""


class Sender(Protocol):
    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        """One result per object, in order; closing the iterator early ends the send cleanly."""
        ...


@dataclass(frozen=True)
class DicomPeerSender:
    peer: DicomPeer
    calling_ae: str

    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        return send_files([(o.path, o.sop_class_uid) for o in objects], self.peer, self.calling_ae)


@dataclass(frozen=True)
class FolderSender:
    folder: Folder
    fsync: bool

    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        for item in objects:
            yield self._copy(item)

    def _copy(self, item: Outgoing) -> SendResult:
        target = self.folder.folder / item.study_instance_uid / f"{item.sop_instance_uid}.dcm"
        try:
            with open(item.path, "rb") as source:
                write_atomic(target, lambda out: shutil.copyfileobj(source, out), fsync=self.fsync)
        except FileNotFoundError as exc:
            return permanent(f"output file missing: {exc}")
        except OSError as exc:  # the folder's disk or mount: may come back
            return retry(f"cannot copy to {target.parent}: {exc.strerror or exc}")
        return sent()


@dataclass(frozen=True)
class DicomWebSender:
    destination: DicomWeb

    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        return stow_files([StowObject(o.path, o.sop_instance_uid) for o in objects], self.destination)


@dataclass(frozen=True)
class HL7Sender:
    """Each study SR as an ORU^R01 (final, or corrected for a revision); anything else is refused."""

    destination: HL7

    def send(self, objects: Sequence[Outgoing]) -> Iterator[SendResult]:
        for index, item in enumerate(objects):
            result = self._send(item)
            yield result
            if result.reason is not None and result.reason.startswith(UNREACHABLE):
                # a listener that does not answer is not asked again in this round: one timeout, not one each
                yield from (retry(f"{result.reason} (not tried)") for _ in objects[index + 1:])
                return

    def _send(self, item: Outgoing) -> SendResult:
        if item.kind is not OutputKind.STUDY_SR:
            kind = item.kind.value if item.kind else "unknown"
            return permanent(f"an HL7 destination takes study SRs only, not {kind} outputs")
        try:
            message = build_oru(read_study_report(item.path), self.destination)
        except FileNotFoundError as exc:
            return permanent(f"output file missing: {exc}")
        except OutputError as exc:
            return permanent(str(exc))
        return send_message(message.text, message.control_id, self.destination)


AnyDestination = DicomPeer | Folder | DicomWeb | HL7


def sender_for(destination: AnyDestination, settings: Settings) -> Sender:
    """The sender of ``destination``'s kind."""
    if isinstance(destination, DicomPeer):
        return DicomPeerSender(destination, settings.dicom.ae_title)
    if isinstance(destination, Folder):
        return FolderSender(destination, settings.storage.fsync)
    if isinstance(destination, DicomWeb):
        return DicomWebSender(destination)
    if isinstance(destination, HL7):
        return HL7Sender(destination)
    assert_never(destination)


def object_destination_names(settings: Settings) -> tuple[str, ...]:
    """The destinations that take every DICOM output (SEG, SR, overlay): all but HL7 ones.

    Study SRs go to every destination (:attr:`Settings.destinations`); an HL7 destination
    turns each into a result message.
    """
    return tuple(d.name for d in settings.destinations if not isinstance(d, HL7))
