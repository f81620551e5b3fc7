"""Decide whether received bytes are a storable instance, without decoding pixels.

Returns the few header fields the store and the database need, or raises
:class:`InvalidInstanceError` carrying the DICOM failure status the peer gets.

pydicom parses lazily: ``dcmread`` only splits the data set into raw elements and an
element's value is converted when it is first read. A corrupt value (a UI whose VR
bytes say FD, a header byte flipped into an unknown VR) would then raise wherever it
is first touched: in the receiver's handler or in the pipeline. So the inspection
converts every element, nested sequence items included, inside its guarded block, and
any exception there is the peer's problem (0xC000), never an unanswered handler.
Before anything is parsed it also bounds what parsing may cost: a deflated data set
may not inflate beyond what its size justifies, the number of sequence items is
capped, and the image geometry must fit its pixel data
(:mod:`gastrolens.dicom_io.documents.geometry`).
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gastrolens.dicom_io.documents.geometry import GeometryError, GeometryLimits, check_geometry
from gastrolens.dicom_uid import is_dicom_uid
from gastrolens.errors import InvalidInstanceError

STATUS_CANNOT_UNDERSTAND = 0xC000
"""Failure: the bytes do not parse as DICOM."""
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""Failure: the data set lacks what its SOP class requires, or names another SOP class."""

REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

MAX_SEQUENCE_DEPTH = 32
"""Nesting deeper than this is no image header; it only invites recursion."""
MAX_ELEMENTS = 100_000
"""Elements and sequence items (pixel fragments included) one data set may hold: each
parsed one costs pydicom several hundred bytes of Python objects for as few as 8 bytes
on the wire. Real image headers hold a few hundred."""
MIB = 2**20
MAX_INFLATED_BYTES = 1024 * MIB
MIN_INFLATE_ALLOWANCE = 64 * MIB
INFLATE_RATIO = 100
"""A deflated data set may inflate to max(64 MiB, 100 x its size), never beyond 1 GiB."""

_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT = "1.2.840.10008.1.2"
_EXPLICIT_BIG = "1.2.840.10008.1.2.2"
_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# The widest value each header field may take (PS3.5 6.2 maximum lengths); the database
# columns are as wide, and a longer value would fail the commit and so the peer forever.
_MAX_LENGTH = {
    "PatientID": 64,
    "PatientName": 324,
    "AccessionNumber": 16,
    "StudyDate": 8,
    "StudyDescription": 64,
    "Modality": 16,
}
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class InstanceHeader:
    """What the store and the database keep about a received instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str
    size_bytes: int
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    series_number: int | None


def inspect_instance(
    data: bytes, negotiated_sop_class: str | None = None, *, limits: GeometryLimits = GeometryLimits()
) -> InstanceHeader:
    """Parse ``data`` (a Part 10 file as received) and check it can be stored."""
    _check_parse_cost(data)
    try:
        ds = dcmread(BytesIO(data), force=False)
        _convert_everything(ds)
        uids = {keyword: ds.get(keyword) for keyword in REQUIRED_UIDS}
        has_pixels = any(k in ds for k in PIXEL_KEYWORDS)
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises a wide variety on corrupt input; all of it is the peer's
        raise InvalidInstanceError(
            f"the data set does not parse: {exc.__class__.__name__}: {_clip(str(exc), 300)}", STATUS_CANNOT_UNDERSTAND
        ) from exc

    for keyword, value in uids.items():
        if not value:
            raise InvalidInstanceError(f"missing {keyword}", STATUS_DOES_NOT_MATCH_SOP_CLASS)
        if not is_dicom_uid(str(value)):
            raise InvalidInstanceError(
                f"{keyword} {str(value)[:80]!r} breaks the DICOM UID grammar", STATUS_DOES_NOT_MATCH_SOP_CLASS
            )
    if not has_pixels:
        raise InvalidInstanceError("no Pixel Data", STATUS_DOES_NOT_MATCH_SOP_CLASS)
    if negotiated_sop_class and str(uids["SOPClassUID"]) != negotiated_sop_class:
        raise InvalidInstanceError(
            f"SOP Class UID {uids['SOPClassUID']} differs from the negotiated {negotiated_sop_class}",
            STATUS_DOES_NOT_MATCH_SOP_CLASS,
        )
    if "PixelData" in ds:
        try:
            check_geometry(ds, limits=limits)
        except GeometryError as exc:
            raise InvalidInstanceError(f"image geometry: {exc}", STATUS_DOES_NOT_MATCH_SOP_CLASS) from exc
    return InstanceHeader(
        study_uid=str(uids["StudyInstanceUID"]),
        series_uid=str(uids["SeriesInstanceUID"]),
        sop_uid=str(uids["SOPInstanceUID"]),
        sop_class_uid=str(uids["SOPClassUID"]),
        transfer_syntax_uid=transfer_syntax,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
    )


def _check_parse_cost(data: bytes) -> None:
    """Refuse data whose parsing would cost far more memory or time than its size justifies.

    pydicom builds a Python object of several hundred bytes for every element and item,
    8 bytes on the wire each: 64 MiB of zeros would become millions of objects and a
    minute of CPU. The encoded elements are counted first, without building anything.
    """
    syntax, body = _split_file_meta(data)
    if syntax == _DEFLATED:
        body = _bounded_inflate(body)
    count = _count_elements(body, explicit=syntax != _IMPLICIT, little=syntax != _EXPLICIT_BIG, limit=MAX_ELEMENTS)
    if count > MAX_ELEMENTS:
        raise InvalidInstanceError(
            f"the data set holds more than {MAX_ELEMENTS} elements and sequence items", STATUS_DOES_NOT_MATCH_SOP_CLASS
        )


def _bounded_inflate(body: bytes) -> bytes:
    allowance = min(MAX_INFLATED_BYTES, max(MIN_INFLATE_ALLOWANCE, INFLATE_RATIO * len(body)))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, allowance)
    except zlib.error as exc:
        raise InvalidInstanceError(f"the deflated data set does not inflate: {exc}", STATUS_CANNOT_UNDERSTAND) from exc
    if not inflater.eof and len(inflated) >= allowance:
        raise InvalidInstanceError(
            f"the deflated data set of {len(body)} bytes inflates to more than {allowance} bytes",
            STATUS_DOES_NOT_MATCH_SOP_CLASS,
        )
    return inflated


def _split_file_meta(data: bytes) -> tuple[str, bytes]:
    """The transfer syntax named in the file meta and the encoded data set after it."""
    if data[128:132] != b"DICM":
        return _IMPLICIT, data
    position = 132
    syntax = b""
    while position + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 0x0002:
            break
        vr = data[position + 4 : position + 6]
        if vr in _LONG_LENGTH_VRS:
            if position + 12 > len(data):
                break
            (length,) = struct.unpack_from("<L", data, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            start = position + 8
        if element == 0x0010:
            syntax = data[start : start + length]
        position = start + length
    return syntax.rstrip(b"\0 ").decode("ascii", "replace"), data[position:]


def _count_elements(body: bytes, *, explicit: bool, little: bool, limit: int) -> int:
    """Elements and items in an encoded data set, nested ones included, counted up to ``limit + 1``.

    A linear walk that steps into sequences and items and over values and pixel
    fragments. It builds nothing; where the structure breaks it stops, and pydicom
    then judges the data.
    """
    order = "<" if little else ">"
    end = len(body)
    position = 0
    count = 0
    in_fragments = False
    while position + 8 <= end and count <= limit:
        group, element, length = struct.unpack_from(f"{order}HHL", body, position)
        count += 1
        if group == 0xFFFE:
            if element == 0xE0DD:
                in_fragments = False
            position += 8 + (length if in_fragments and element == 0xE000 else 0)
            continue
        vr = body[position + 4 : position + 6]
        if explicit and vr.isalpha() and vr.isupper():
            if vr in _LONG_LENGTH_VRS:
                if position + 12 > end:
                    break
                (length,) = struct.unpack_from(f"{order}L", body, position + 8)
                header = 12
            else:
                (length,) = struct.unpack_from(f"{order}H", body, position + 6)
                header = 8
            descend = vr == b"SQ" or length == _UNDEFINED_LENGTH
        else:
            header = 8
            descend = length == _UNDEFINED_LENGTH or _dictionary_vr(group << 16 | element) == "SQ"
        if descend:
            in_fragments = length == _UNDEFINED_LENGTH and (group, element) == (0x7FE0, 0x0010)
            position += header
        else:
            position += header + length
    return count


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _convert_everything(ds: Dataset) -> None:
    """Convert every raw element, nested ones included, so that corrupt values raise here.

    Iterative (no recursion on hostile nesting), bounded in depth and element count.
    """
    pending: list[tuple[Dataset, int]] = [(ds, 0)]
    converted = 0
    while pending:
        current, depth = pending.pop()
        if depth > MAX_SEQUENCE_DEPTH:
            raise InvalidInstanceError(
                f"sequences are nested more than {MAX_SEQUENCE_DEPTH} deep", STATUS_DOES_NOT_MATCH_SOP_CLASS
            )
        for tag in list(current.keys()):
            converted += 1
            if converted > MAX_ELEMENTS:
                raise InvalidInstanceError(
                    f"the data set holds more than {MAX_ELEMENTS} elements", STATUS_DOES_NOT_MATCH_SOP_CLASS
                )
            raw = current.get_item(tag)
            _check_complete(raw)
            try:
                element = current[tag]  # converts the raw element: a corrupt value raises here
            except Exception as exc:
                raise ValueError(f"element {_name(tag)} does not convert: {exc.__class__.__name__}: {exc}") from exc
            if isinstance(element.value, Sequence):
                pending.extend((item, depth + 1) for item in element.value)


def _name(tag: int) -> str:
    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}){' ' + keyword if keyword else ''}"


def _check_complete(raw: object) -> None:
    """pydicom keeps a value cut short by the end of the data as if it were whole: refuse it."""
    if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH or raw.value is None:
        return
    if len(raw.value) < raw.length:
        raise ValueError(f"element {raw.tag} declares {raw.length} bytes, only {len(raw.value)} follow (truncated)")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _text(ds: Dataset, keyword: str) -> str | None:
    """A header field as a database can hold it: no control characters, no wider than its VR allows."""
    try:
        value = ds.get(keyword)
        text = str(value) if value is not None else ""
    except Exception:  # a value that does not decode in its character set is not worth failing on
        return None
    text = _CONTROL.sub("", text).strip()[: _MAX_LENGTH[keyword]]
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    if number is None or not -_INT32_MAX <= number <= _INT32_MAX:
        return None
    return number
