"""Byte templates: encode a reference-built dataset once, then write many like it fast.

Building a SEG or SR with highdicom costs tens of milliseconds and writing a deep SR tree
with pydicom about as much again, while the objects GastroLens writes for two images of
the same kind differ only in a few dozen values (UIDs, patient and study attributes,
probabilities, pixel data, times). A :class:`Template` is the Explicit VR Little Endian
encoding of one reference object cut into constant byte runs and :class:`Slot` s; filling
it with another image's values gives the bytes the reference builder would have written
for that image.

Slots are found by *sentinels*: the reference object is built from inputs whose
per-image values were replaced by unique, recognisable values, and every element that
carries one of them becomes a slot named after the input it came from. Sequences and
items are written with undefined length (PS3.5 7.5), so a slot whose value changes length
never invalidates an enclosing length. After compiling, the constant bytes are searched
for every sentinel: one found there means the builder transformed an input we did not
recognise, and the template is refused (the caller falls back to the reference builder).
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import __version__ as pydicom_version
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import DS, DSfloat

TIME_KEYWORDS = frozenset(
    {
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "SeriesDate",
        "SeriesTime",
        "DateOfSecondaryCapture",
        "TimeOfSecondaryCapture",
    }
)
"""Top-level attributes that hold the time of writing: filled with the current time."""
NESTED_TIME_KEYWORDS = frozenset({"ContributionDateTime"})
"""The same at any depth (highdicom's Contributing Equipment item)."""

PIXELS = "pixels"
NOW = "now"
_MIN_CHECKED_SENTINEL = 8
_UNDEFINED = b"\xff\xff\xff\xff"
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_START = b"\xfe\xff\x00\xe0" + _UNDEFINED
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"


class TemplateError(Exception):
    """The reference object cannot be turned into a template (a sentinel leaked)."""


@dataclass(frozen=True, kw_only=True)
class Slot:
    """One element whose value is filled per image."""

    name: str
    tag: BaseTag
    vr: str


@dataclass(frozen=True, kw_only=True)
class Template:
    """A reference object as constant byte runs and slots, ready to be filled."""

    parts: tuple[bytes | Slot, ...]
    sop_class_uid: str
    encodings: tuple[str, ...]
    transfer_syntax_uid: str = ExplicitVRLittleEndian
    """The reference object's: Explicit VR Little Endian, or JPEG Baseline (encapsulated pixels)."""

    @property
    def slot_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.parts if isinstance(p, Slot))


def sentinel_key(value: Any, vr: str) -> str | None:
    """How an element value is looked up among the sentinels (None: never a slot)."""
    if vr in ("FD", "FL"):
        return f"fd:{value!r}" if isinstance(value, float) else None
    if isinstance(value, (str, int, float)):  # str, UID, DSfloat, IS, PersonName is below
        return str(value)
    if value.__class__.__name__ == "PersonName":
        return str(value)
    return None


def compile_template(ds: Dataset, sentinels: Mapping[str, str], computed: Mapping[str, str] | None = None) -> Template:
    """Cut ``ds`` into constant bytes and slots; ``sentinels`` maps sentinel keys
    (:func:`sentinel_key`) to slot names, ``computed`` top-level keywords whose value the
    caller computes per image (not from an input: a compression ratio) to slot names.
    Raises :class:`TemplateError` on a leak."""
    computed = computed or {}
    meta = getattr(ds, "file_meta", None)
    declared = UID(str(meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian) if meta is not None else "")
    encapsulated = declared.is_compressed if declared else False
    syntax = str(declared) if encapsulated else ExplicitVRLittleEndian  # anything else is written explicit
    charset = ds.get("SpecificCharacterSet")
    encodings = tuple(convert_encodings(charset))
    parts: list[bytes | Slot] = []
    buffer = _buffer()

    def flush() -> None:
        nonlocal buffer
        data = buffer.getvalue()
        if data:
            parts.append(data)
        buffer = _buffer()

    def walk(dataset: Dataset, top: bool) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                buffer.write(_tag_bytes(elem.tag) + b"SQ\x00\x00" + _UNDEFINED)
                for item in elem.value:
                    buffer.write(_ITEM_START)
                    walk(item, False)
                    buffer.write(_ITEM_DELIMITER)
                buffer.write(_SEQUENCE_DELIMITER)
                continue
            name: str | None
            vr = elem.VR
            if (top and elem.keyword in TIME_KEYWORDS) or elem.keyword in NESTED_TIME_KEYWORDS:
                name = f"{NOW}:{elem.VR}"
            elif top and elem.keyword == "PixelData":
                name = PIXELS
                if encapsulated:
                    vr = "OB"
                elif vr not in ("OB", "OW"):  # 'OB or OW' from pydicom: 8-bit pixels are OB
                    vr = "OB" if int(dataset.get("BitsAllocated", 8)) <= 8 else "OW"
            elif top and elem.keyword in computed:
                name = computed[elem.keyword]
            else:
                key = None if elem.VM != 1 else sentinel_key(elem.value, elem.VR)
                name = sentinels.get(key) if key is not None else None
            if name is None:
                write_data_element(buffer, elem, list(encodings))
            else:
                flush()
                parts.append(Slot(name=name, tag=elem.tag, vr=vr))

    walk(ds, True)
    flush()
    constant = b"".join(p for p in parts if isinstance(p, bytes))
    for key, name in sentinels.items():
        text = key.removeprefix("fd:")
        if not key.startswith("fd:") and len(text) >= _MIN_CHECKED_SENTINEL and text.encode() in constant:
            raise TemplateError(f"sentinel for {name} ({text}) survived in a constant part")
    return Template(parts=tuple(parts), sop_class_uid=str(ds.SOPClassUID), encodings=encodings,
                    transfer_syntax_uid=syntax)


ValueOf = Callable[[str], Any]


def render(
    template: Template,
    sop_instance_uid: str,
    value_of: ValueOf,
    created: datetime.datetime,
    memo: dict[tuple[int, str, str], bytes] | None = None,
) -> list[bytes | memoryview]:
    """The whole file (preamble, meta, data set) for one image, as parts to write in order
    (pixel data is passed through as it came, not copied into one buffer).

    ``value_of(name)`` gives the value of a slot: the raw value for a source attribute,
    a float for a probability (written as DS and FD as highdicom writes it), bytes for
    pixel data (native, or the encapsulated items when the template's transfer syntax
    is compressed). Raises KeyError for a slot the caller has no value for. ``memo`` keeps
    encoded slots between the objects of one image (same values, same character set).
    """
    memo = {} if memo is None else memo
    out: list[bytes | memoryview] = [b"\x00" * 128 + b"DICM",
                                     file_meta(template.sop_class_uid, sop_instance_uid, template.transfer_syntax_uid)]
    encapsulated = UID(template.transfer_syntax_uid).is_compressed
    for part in template.parts:
        if isinstance(part, bytes):
            out.append(part)
        elif part.name.startswith(NOW):
            out.append(_encode_ascii(part.tag, part.vr, _time_value(part.vr, created), b" "))
        elif part.name == PIXELS and encapsulated:
            out.extend((_tag_bytes(part.tag) + b"OB\x00\x00" + _UNDEFINED, value_of(part.name), _SEQUENCE_DELIMITER))
        elif part.name == PIXELS:
            out.extend(_pixel_parts(part, value_of(part.name)))
        else:
            key = (int(part.tag), part.vr, part.name)
            encoded = memo.get(key)
            if encoded is None:
                encoded = encode_element(part, value_of(part.name), template.encodings)
                memo[key] = encoded
            out.append(encoded)
    return out


def _pixel_parts(slot: Slot, value: bytes | memoryview) -> list[bytes | memoryview]:
    """Pixel Data as its header and the caller's buffer (even length, padded if not)."""
    length = memoryview(value).nbytes
    parts: list[bytes | memoryview] = [_header(slot.tag, slot.vr, length + length % 2), value]
    if length % 2:
        parts.append(b"\x00")
    return parts


_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
_NUMBER_VRS = frozenset({"DS", "IS"})


def encode_element(slot: Slot, value: Any, encodings: tuple[str, ...]) -> bytes:
    """One element in Explicit VR Little Endian, as pydicom writes it.

    UIDs, numbers and bytes are encoded here (they are most slots, and pydicom's general
    writer costs tens of microseconds an element); text in the data set's character set
    is left to pydicom.
    """
    vr = slot.vr
    if vr == "UI":
        return _encode_ascii(slot.tag, vr, str(value), b"\x00")
    if vr == "DS" and isinstance(value, DSfloat):  # a copied value keeps its own spelling
        return _encode_ascii(slot.tag, vr, str(value), b" ")
    if vr == "DS" and isinstance(value, float):  # a computed one is written as highdicom writes it
        return _encode_ascii(slot.tag, vr, str(DS(value, auto_format=True)), b" ")
    if vr in _NUMBER_VRS and isinstance(value, (int, float, str)):
        return _encode_ascii(slot.tag, vr, str(value), b" ")
    if vr == "FD" and isinstance(value, float):
        return _header(slot.tag, vr, 8) + struct.pack("<d", value)
    if vr in ("OB", "OW") and isinstance(value, (bytes, bytearray)):
        return _header(slot.tag, vr, len(value)) + bytes(value)
    buffer = _buffer()
    write_data_element(buffer, DataElement(slot.tag, vr, value), list(encodings))
    return buffer.getvalue()


def _tag_bytes(tag: BaseTag) -> bytes:
    return int(tag >> 16).to_bytes(2, "little") + int(tag & 0xFFFF).to_bytes(2, "little")


def _encode_ascii(tag: BaseTag, vr: str, text: str, padding: bytes) -> bytes:
    data = text.encode("ascii")
    if len(data) % 2:
        data += padding
    return _header(tag, vr, len(data)) + data


def _header(tag: BaseTag, vr: str, length: int) -> bytes:
    if vr in _LONG_VRS:
        return _tag_bytes(tag) + vr.encode() + b"\x00\x00" + struct.pack("<I", length)
    return _tag_bytes(tag) + vr.encode() + struct.pack("<H", length)


def _time_value(vr: str, created: datetime.datetime) -> str:
    if vr == "DA":
        return created.strftime("%Y%m%d")
    if vr == "TM":
        return created.strftime("%H%M%S")
    return created.strftime("%Y%m%d%H%M%S")


_META_VERSION = _header(BaseTag(0x00020001), "OB", 2) + b"\x00\x01"
_META_TAIL = b"".join(
    _encode_ascii(BaseTag(tag), vr, value, b"\x00" if vr == "UI" else b" ")
    for tag, vr, value in (
        (0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID),
        (0x00020013, "SH", f"PYDICOM {pydicom_version}"),
    )
)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str = ExplicitVRLittleEndian) -> bytes:
    """File Meta Information (PS3.10 7.1); the data set is Explicit VR Little Endian
    (JPEG Baseline is too, with encapsulated pixel data)."""
    body = (
        _META_VERSION
        + _encode_ascii(BaseTag(0x00020002), "UI", sop_class_uid, b"\x00")
        + _encode_ascii(BaseTag(0x00020003), "UI", sop_instance_uid, b"\x00")
        + _encode_ascii(BaseTag(0x00020010), "UI", transfer_syntax_uid, b"\x00")
        + _META_TAIL
    )
    return _header(BaseTag(0x00020000), "UL", 4) + struct.pack("<I", len(body)) + body


def _buffer() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    return buffer


