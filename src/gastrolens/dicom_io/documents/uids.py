"""Deterministic UIDs for everything GastroLens writes.

Processing the same image with the same model again must give the same UIDs, so a PACS
replaces the earlier result instead of storing a duplicate. Every UID here is a
name-based UUID (RFC 9562 version 5, SHA-1) in the ``2.25`` arc (ISO/IEC 9834-8,
PS3.5 B.2), so GastroLens needs no registered organisation root and two sites can never
collide. The name hashed is a ``|``-joined record of a scheme tag, the output kind and
the inputs, so no two different inputs spell the same name.

- instance UID of a per-image output: (kind, source SOP Instance UID, weights sha256)
- series UID of a per-image output: (kind, source Study Instance UID, weights sha256):
  one SEG, one SR and one overlay series per study and model, which is how viewers
  show them best. The study is fixed by the source, so this is still a pure function
  of the source instance.
- study SR: (Study Instance UID, weights sha256, revision); its series does not depend
  on the revision, so all versions of the study report share one series.
"""

from __future__ import annotations

import re
import uuid

from pydicom.uid import UID

from gastrolens.dicom_uid import is_dicom_uid
from gastrolens.errors import OutputError
from gastrolens.findings import OutputKind

_NAMESPACE = uuid.UUID("5b1d0f1e-6a43-5e0c-9b0c-6761737472f1")
"""Fixed namespace for GastroLens names; never change it (it would change every UID)."""

_SCHEME = "gastrolens-uid-v1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _uid(*parts: str) -> UID:
    name = "|".join((_SCHEME, *parts))
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


def _check(source_uid: str, what: str, weights_sha256: str) -> None:
    if not isinstance(source_uid, str) or not is_dicom_uid(source_uid):
        raise OutputError(f"{what} {source_uid!r} is not a valid UID")
    if not _SHA256.match(weights_sha256):
        raise OutputError(
            f"model weights sha256 {weights_sha256!r} is not 64 lowercase hex digits"
        )


def _check_kind(kind: OutputKind) -> OutputKind:
    if not isinstance(kind, OutputKind):
        raise OutputError(f"{kind!r} is not an OutputKind")
    if kind is OutputKind.STUDY_SR:
        raise OutputError("study SR UIDs come from study_sr_instance_uid / study_sr_series_uid")
    return kind


def instance_uid(kind: OutputKind, source_sop_instance_uid: str, weights_sha256: str) -> UID:
    """SOP Instance UID of the ``kind`` output made from one source instance."""
    _check_kind(kind)
    _check(source_sop_instance_uid, "source SOP Instance UID", weights_sha256)
    return _uid("instance", kind.value, source_sop_instance_uid, weights_sha256)


def series_uid(kind: OutputKind, study_instance_uid: str, weights_sha256: str) -> UID:
    """Series Instance UID of the ``kind`` outputs of one study made by one model."""
    _check_kind(kind)
    _check(study_instance_uid, "Study Instance UID", weights_sha256)
    return _uid("series", kind.value, study_instance_uid, weights_sha256)


def study_sr_instance_uid(study_instance_uid: str, weights_sha256: str, revision: int) -> UID:
    """SOP Instance UID of revision ``revision`` (1, 2, ...) of a study's conclusion SR."""
    _check(study_instance_uid, "Study Instance UID", weights_sha256)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise OutputError(f"study SR revision must be an integer >= 1, got {revision!r}")
    return _uid("instance", OutputKind.STUDY_SR.value, study_instance_uid, weights_sha256, str(revision))


def study_sr_series_uid(study_instance_uid: str, weights_sha256: str) -> UID:
    """Series Instance UID shared by every revision of a study's conclusion SR."""
    _check(study_instance_uid, "Study Instance UID", weights_sha256)
    return _uid("series", OutputKind.STUDY_SR.value, study_instance_uid, weights_sha256)


def derived_uid(purpose: str, *parts: str) -> UID:
    """A deterministic UID for anything else an output needs (tracking UIDs, device UID)."""
    if not purpose:
        raise OutputError("derived_uid needs a purpose")
    return _uid("derived", purpose, *parts)
