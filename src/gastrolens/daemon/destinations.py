"""One sender per kind of destination, each with one ``send`` that yields a typed result per object.

The configuration says what a destination is (:class:`~gastrolens.config.schema.DicomPeer`
or :class:`~gastrolens.config.schema.Folder`); :func:`sender_for` gives the code that
sends to it. ``send`` takes every object due for that destination at once (one
association for a DICOM peer) and yields one :class:`~gastrolens.sending.SendResult`
per object, in order, as each is done, so delivery records each before the next goes.
A new kind of destination is a new config model in the union plus a case here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, assert_never

from gastrolens.config import Settings
from gastrolens.config.schema import DicomPeer, Folder
from gastrolens.dicom_io.net.send import send_files
from gastrolens.sending import SendResult, permanent, retry, sent
from gastrolens.storage.atomic import write_atomic


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One stored output to send."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str


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


def sender_for(destination: DicomPeer | Folder, settings: Settings) -> Sender:
    """The sender of ``destination``'s kind."""
    if isinstance(destination, DicomPeer):
        return DicomPeerSender(destination, settings.dicom.ae_title)
    if isinstance(destination, Folder):
        return FolderSender(destination, settings.storage.fsync)
    assert_never(destination)
