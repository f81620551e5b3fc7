"""The study SR written fast: highdicom builds a skeleton, the repeated items are spliced in as bytes.

Building a 50-image study SR with highdicom costs over a second (an Image Library entry
per image, deep copies and tree searches that grow with the images) and writing it with
pydicom about 150 ms more, and a study is reported again whenever images keep arriving.
What grows with the images is a handful of item shapes that differ only in UIDs: the
IMAGE item of each source frame in a class group, the Image Library entry of each
source instance, and the evidence references. So highdicom builds the same SR as a
*skeleton* (:func:`study_sr.build_study_skeleton`: each group and library group with one
representative image) and its Explicit VR Little Endian encoding is written here with
each representative replaced by the items of every image it stands for, built from the
representative's own constant bytes and the image's UIDs. Sequences and items have
undefined length (PS3.5 7.5), so splicing never changes an enclosing length.

Everything else (attributes copied from the first source, observer, groups, conclusion,
predecessor, character set) comes from highdicom as it is, and
``tests/dicom_io/documents/test_study_sr_fast.py`` compares whole trees with the reference.
Sources that highdicom describes with more than modality, rows and columns in the Image
Library (a Frame of Reference, CT/MR/PT or projection radiography) are refused with
:class:`FastStudyRefused`; the caller then uses the reference builder.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian

from gastrolens.dicom_io.documents.common import references_frames
from gastrolens.dicom_io.documents.sr import PredecessorRef
from gastrolens.dicom_io.documents.study_sr import build_study_skeleton
from gastrolens.findings import ImageFinding, ModelIdentity

if TYPE_CHECKING:
    from gastrolens.models.conclusion import StudyConclusion

_UNDEFINED = b"\xff\xff\xff\xff"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_START = b"\xfe\xff\x00\xe0" + _UNDEFINED
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_REFERENCED_SOP = 0x00081199
_CONTENT_SEQUENCE = 0x0040A730
_EVIDENCE = 0x0040A375
_VALUE_TYPE = 0x0040A040
_LIBRARY_CODE = "111028"
_MEASUREMENTS_CODE = "126010"
_RICHER_MODALITIES = frozenset({"CT", "MR", "PT", "CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_DESCRIPTOR_CACHE_SIZE = 256
_descriptors: dict[tuple[str, int, int, str], bytes] = {}

Emit = Callable[[list[bytes]], None]


class FastStudyRefused(Exception):
    """The fast path does not cover this study; use the reference builder."""


@dataclass(frozen=True, kw_only=True)
class EncodedStudySR:
    """A study SR as the parts of its file, in order, and its identity."""

    parts: list[bytes]
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str


def encode_study_sr(
    study: Sequence[tuple[Dataset, Sequence[ImageFinding]]],
    models: Sequence[ModelIdentity],
    conclusion: StudyConclusion,
    *,
    revision: int = 1,
    predecessor: PredecessorRef | None = None,
) -> EncodedStudySR:
    """The file that :func:`study_sr.build_study_sr` would give for the same inputs (times apart)."""
    for header, _ in study:
        if "FrameOfReferenceUID" in header or header.get("Modality") in _RICHER_MODALITIES:
            raise FastStudyRefused(f"source {header.SOPInstanceUID}: richer image library entry")
    plan = build_study_skeleton(study, models, conclusion, revision=revision, predecessor=predecessor, skeleton=True)
    sr = plan.sr
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    encodings = list(convert_encodings(sr.get("SpecificCharacterSet")))
    hooks: dict[int, Emit] = {}
    _hook_groups(sr, plan.images, plan.group_sources, encodings, hooks)
    _hook_library(sr, plan.headers, encodings, hooks)
    out: list[bytes] = [b"\x00" * 128 + b"DICM", _file_meta(sr.file_meta, encodings)]
    for elem in sr:
        if elem.tag == _EVIDENCE:
            out.append(_evidence(plan.headers))
        else:
            _element(elem, out, encodings, hooks)
    return EncodedStudySR(
        parts=out,
        sop_instance_uid=str(sr.SOPInstanceUID),
        series_instance_uid=str(sr.SeriesInstanceUID),
        sop_class_uid=str(sr.SOPClassUID),
        study_instance_uid=str(sr.StudyInstanceUID),
    )


def _container(sr: Dataset, code: str) -> Dataset:
    for item in sr.ContentSequence:
        names = item.get("ConceptNameCodeSequence") or []
        if item.get("ValueType") == "CONTAINER" and names and names[0].CodeValue == code:
            found: Dataset = item
            return found
    raise FastStudyRefused(f"the skeleton has no container {code}")


def _hook_groups(
    sr: Dataset,
    images: list[tuple[Dataset, int, ImageFinding]],
    group_sources: list[list[int]],
    encodings: list[str],
    hooks: dict[int, Emit],
) -> None:
    """Each class group's one IMAGE item stands for the IMAGE items of all its frames."""
    groups = [
        g
        for g in _container(sr, _MEASUREMENTS_CODE).ContentSequence
        if any(item.get("ValueType") == "IMAGE" for item in g.ContentSequence)
    ]
    if len(groups) != len(group_sources):
        raise FastStudyRefused("skeleton groups do not match the class groups")
    for group, indices in zip(groups, group_sources, strict=True):
        (placeholder,) = [item for item in group.ContentSequence if item.get("ValueType") == "IMAGE"]
        constant = _constant_parts(placeholder, encodings, (_REFERENCED_SOP,))
        sources = [(images[i][0], images[i][1]) for i in indices]

        def emit(
            out: list[bytes], constant: dict[int, bytes] = constant, sources: list[tuple[Dataset, int]] = sources
        ) -> None:
            before, after = constant[-1], constant[1]
            for header, frame in sources:
                framed = frame if references_frames(header) else None
                out += (_ITEM_START, before, _referenced_sop(header, framed), after, _ITEM_DELIMITER)

        hooks[id(placeholder)] = emit


def _hook_library(sr: Dataset, headers: list[Dataset], encodings: list[str], hooks: dict[int, Emit]) -> None:
    """The first entry of each Image Library group stands for every source of its modality;
    the group's other entries (other SOP classes of the same modality) are written by it."""
    library = _container(sr, _LIBRARY_CODE)
    for library_group in library.ContentSequence:
        entries = [item for item in library_group.ContentSequence if item.get("ValueType") == "IMAGE"]
        classes = {entry.ReferencedSOPSequence[0].ReferencedSOPClassUID for entry in entries}
        members = [header for header in headers if header.SOPClassUID in classes]
        constant = _constant_parts(entries[0], encodings, (_REFERENCED_SOP, _CONTENT_SEQUENCE))

        def emit(out: list[bytes], constant: dict[int, bytes] = constant, members: list[Dataset] = members) -> None:
            for header in members:
                out += (
                    _ITEM_START,
                    constant[-1],
                    _referenced_sop(header, None),
                    constant[1],
                    _library_descriptors(header, encodings),
                    constant[2],
                    _ITEM_DELIMITER,
                )

        hooks[id(entries[0])] = emit
        for other in entries[1:]:
            hooks[id(other)] = _nothing


def _nothing(out: list[bytes]) -> None:
    """An entry written by its group's first entry."""


def _constant_parts(item: Dataset, encodings: list[str], cut: tuple[int, ...]) -> dict[int, bytes]:
    """``item``'s encoding cut at the elements in ``cut``: -1 before the first, n after the n-th."""
    parts: dict[int, bytes] = {}
    current: list[bytes] = []
    index = -1
    for elem in item:
        if int(elem.tag) in cut:
            parts[index] = b"".join(current)
            current, index = [], index + 2 if index == -1 else index + 1
            continue
        _element(elem, current, encodings, {})
    parts[index] = b"".join(current)
    for n in (-1, *range(1, len(cut) + 1)):
        parts.setdefault(n, b"")
    return parts


def _library_descriptors(header: Dataset, encodings: list[str]) -> bytes:
    """The Content Sequence of an Image Library entry (modality, rows, columns), cached by those."""
    key = (str(header.SOPClassUID), int(header.Rows), int(header.Columns), str(header.get("Modality", "")))
    encoded = _descriptors.get(key)
    if encoded is None:
        out: list[bytes] = [_tag(_CONTENT_SEQUENCE) + b"SQ\x00\x00" + _UNDEFINED]
        for item in hd.sr.ImageLibraryEntryDescriptors(header):
            out.append(_ITEM_START)
            for elem in item:
                _element(elem, out, encodings, {})
            out.append(_ITEM_DELIMITER)
        out.append(_SEQUENCE_DELIMITER)
        encoded = b"".join(out)
        if len(_descriptors) >= _DESCRIPTOR_CACHE_SIZE:
            _descriptors.clear()
        _descriptors[key] = encoded
    return encoded


def _evidence(headers: list[Dataset]) -> bytes:
    """Current Requested Procedure Evidence Sequence as highdicom's ``collect_evidence`` makes
    it for one study: series in order of first appearance, each instance once."""
    series: dict[str, list[bytes]] = {}
    seen: set[str] = set()
    for header in headers:
        if header.SOPInstanceUID in seen:
            continue
        seen.add(header.SOPInstanceUID)
        series.setdefault(str(header.SeriesInstanceUID), []).append(
            _ITEM_START + _ui(0x00081150, header.SOPClassUID) + _ui(0x00081155, header.SOPInstanceUID) + _ITEM_DELIMITER
        )
    out = [_tag(_EVIDENCE) + b"SQ\x00\x00" + _UNDEFINED, _ITEM_START, _tag(0x00081115) + b"SQ\x00\x00" + _UNDEFINED]
    for series_uid, items in series.items():
        out += (
            _ITEM_START,
            _tag(_REFERENCED_SOP) + b"SQ\x00\x00" + _UNDEFINED,
            *items,
            _SEQUENCE_DELIMITER,
            _ui(0x0020000E, series_uid),
            _ITEM_DELIMITER,
        )
    out += (_SEQUENCE_DELIMITER, _ui(0x0020000D, headers[0].StudyInstanceUID), _ITEM_DELIMITER, _SEQUENCE_DELIMITER)
    return b"".join(out)


def _referenced_sop(header: Dataset, frame: int | None) -> bytes:
    body = _ui(0x00081150, header.SOPClassUID) + _ui(0x00081155, header.SOPInstanceUID)
    if frame is not None:
        body += _text(0x00081160, b"IS", str(frame))
    return (
        _tag(_REFERENCED_SOP) + b"SQ\x00\x00" + _UNDEFINED + _ITEM_START + body + _ITEM_DELIMITER + _SEQUENCE_DELIMITER
    )


def _element(elem: DataElement, out: list[bytes], encodings: list[str], hooks: dict[int, Emit]) -> None:
    if elem.VR == "SQ":
        out.append(_tag(int(elem.tag)) + b"SQ\x00\x00" + _UNDEFINED)
        for item in elem.value:
            hook = hooks.get(id(item))
            if hook is not None:
                hook(out)
                continue
            out.append(_ITEM_START)
            for child in item:
                _element(child, out, encodings, hooks)
            out.append(_ITEM_DELIMITER)
        out.append(_SEQUENCE_DELIMITER)
        return
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, elem, encodings)
    out.append(buffer.getvalue())


def _file_meta(meta: Dataset, encodings: list[str]) -> bytes:
    body: list[bytes] = []
    for elem in meta:
        if int(elem.tag) != 0x00020000:
            _element(elem, body, encodings, {})
    data = b"".join(body)
    return _tag(0x00020000) + b"UL" + struct.pack("<H", 4) + struct.pack("<I", len(data)) + data


def _tag(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def _ui(tag: int, value: str) -> bytes:
    data = str(value).encode("ascii")
    if len(data) % 2:
        data += b"\x00"
    return _tag(tag) + b"UI" + struct.pack("<H", len(data)) + data


def _text(tag: int, vr: bytes, value: str) -> bytes:
    data = value.encode("ascii")
    if len(data) % 2:
        data += b" "
    return _tag(tag) + vr + struct.pack("<H", len(data)) + data
