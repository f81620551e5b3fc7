"""A seeded generator of hostile DICOM files made from real-looking sources.

Sources: GastroLens' synthetic endoscopy images (VL Endoscopic JPEG baseline, Secondary
Capture RGB explicit and implicit little endian) and the real Secondary Capture files
pydicom ships (RLE, JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000, deflate,
YBR_FULL_422, files without Modality). Every case gets fresh study, series and SOP
instance UIDs, then one mutation of a category:

* data-set level (re-encoded by pydicom): absurd geometry, hostile strings, deep or huge
  sequences, transfer-syntax mismatches;
* byte level (on the encoded file, file meta left intact): truncation, byte flips in
  the header and in the pixel data, absurd lengths, wrong VRs.

``clean`` cases are the sources unchanged: they must be stored. The same seed gives the
same cases, so a failure names a case that can be made again.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from gastrolens.findings import LesionClass
from gastrolens.samples import SECONDARY_CAPTURE, VL_ENDOSCOPIC, as_dicom, endoscopy_frame

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
REAL_SOURCES = (
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1 (.70)
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_gdcm_KY.dcm",  # JPEG 2000
    "SC_ybr_full_422_uncompressed.dcm",
    "image_dfl.dcm",  # deflated explicit VR little endian
    "JPEGLSNearLossless_08.dcm",  # no Modality
    "JPEG-lossy.dcm",  # JPEG extended (.51), 12 bit
)


class Category(str, Enum):
    CLEAN = "clean"
    TRUNCATION = "truncation"
    HEADER_FLIP = "header-flip"
    PIXEL_FLIP = "pixel-flip"
    ABSURD_LENGTH = "absurd-length"
    WRONG_VR = "wrong-vr"
    DEEP_SEQUENCE = "deep-sequence"
    HUGE_SEQUENCE = "huge-sequence"
    SYNTAX_MISMATCH = "syntax-mismatch"
    ABSURD_GEOMETRY = "absurd-geometry"
    HOSTILE_STRING = "hostile-string"


@dataclass(frozen=True, kw_only=True)
class Case:
    number: int
    category: Category
    source: str
    detail: str
    sop_class_uid: str
    transfer_syntax_uid: str
    data: bytes

    @property
    def name(self) -> str:
        return f"#{self.number} {self.category.value} {self.source}: {self.detail}"


@dataclass(frozen=True)
class Source:
    name: str
    data: bytes


def sources() -> list[Source]:
    """The unmutated files, encoded once."""
    made: list[Source] = []
    frame, _ = endoscopy_frame(48, 64, LesionClass.PU, seed=3)
    made.append(
        Source("samples VL endoscopic JPEG", _encode(as_dicom(frame, sop_class=VL_ENDOSCOPIC, jpeg_quality=90)))
    )
    made.append(Source("samples SC RGB explicit", _encode(as_dicom(frame, sop_class=SECONDARY_CAPTURE))))
    implicit = as_dicom(frame, sop_class=SECONDARY_CAPTURE)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    made.append(Source("samples SC RGB implicit", _encode(implicit)))
    for name in REAL_SOURCES:
        made.append(Source(f"pydicom {name}", (PYDICOM_FILES / name).read_bytes()))
    return made


def generate(count: int, seed: int) -> list[Case]:
    """``count`` cases, every category in turn (clean first), from the seeded ``random.Random``."""
    rng = random.Random(seed)
    pool = sources()
    categories = list(Category)
    cases: list[Case] = []
    for number in range(count):
        category = categories[number % len(categories)]
        source = pool[(number // len(categories)) % len(pool)] if category is Category.CLEAN else rng.choice(pool)
        if category in (Category.DEEP_SEQUENCE, Category.HUGE_SEQUENCE):
            source = rng.choice([s for s in pool if "dfl" not in s.name])  # inserted bytes need a plain data set
        ds = dcmread(BytesIO(source.data))
        _fresh_uids(ds)
        detail = ""
        if category in _DATASET_MUTATIONS:
            detail = _DATASET_MUTATIONS[category](rng, ds)
        data = _encode(ds)
        if category in _BYTE_MUTATIONS:
            data, detail = _BYTE_MUTATIONS[category](rng, data)
        meta = _meta_values(data)
        cases.append(
            Case(
                number=number,
                category=category,
                source=source.name,
                detail=detail or "unchanged",
                sop_class_uid=meta[0x0002],
                transfer_syntax_uid=meta[0x0010],
                data=data,
            )
        )
    return cases


def write(case: Case, folder: Path) -> Path:
    path = folder / f"case-{case.number:05d}.dcm"
    path.write_bytes(case.data)
    return path


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _fresh_uids(ds: Dataset) -> None:
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


# -- data-set mutations (return a description) -----------------------------------------------


def _absurd_geometry(rng: random.Random, ds: Dataset) -> str:
    """Each claims more than 64 MiB a frame, or more frames than the pixel data can hold."""
    choice = rng.choice(
        [
            {"Rows": 65535, "Columns": 65535},
            {"NumberOfFrames": 2**31 - 1},
            {"NumberOfFrames": 2**31 - 1, "Rows": 65535},
            {"Rows": 65535, "Columns": 2000},
            {"Columns": 40000, "Rows": 4000, "SamplesPerPixel": 3},
            {"SamplesPerPixel": 7},
            {"BitsAllocated": 64, "BitsStored": 64, "HighBit": 63, "Rows": 60000, "Columns": 60000},
            {"NumberOfFrames": 100000},
        ]
    )
    for keyword, value in choice.items():
        setattr(ds, keyword, value)
    return ", ".join(f"{k}={v}" for k, v in choice.items())


_HOSTILE = [
    "Robert'); DROP TABLE studies;--",
    "../../../../etc/passwd",
    "%s%s%s%n%n",
    "A" * 10_000,
    "\x00\x01\x02\x1b[31m",
    "名前^太郎",
    "<script>alert(1)</script>",
    "\u202eevil",
    "${jndi:ldap://x}",
]


def _hostile_string(rng: random.Random, ds: Dataset) -> str:
    keyword = rng.choice(
        [
            "PatientName",
            "PatientID",
            "AccessionNumber",
            "StudyDescription",
            "StudyDate",
            "Modality",
            "SeriesNumber",
            "SpecificCharacterSet",
            "InstitutionName",
        ]
    )
    value = rng.choice(_HOSTILE)
    if keyword == "SpecificCharacterSet":
        value = rng.choice(["ISO_fR 100", "ISO_IR 192", "GB18030", "\x00", "ISO 2022 IR 87\\ISO 2022 IR 13"])
        ds.PatientName = rng.choice(_HOSTILE)
    if keyword == "SeriesNumber":
        value = rng.choice(["99999999999999999999", "-1", "NaN", "1e400"])
    tag = pydicom.datadict.tag_for_keyword(keyword)
    raw = value.encode("utf-8")
    raw += b" " * (len(raw) % 2)
    # a raw element is written as it is: no validation, no conversion on the way out
    ds[tag] = RawDataElement(BaseTag(tag), pydicom.datadict.dictionary_VR(tag), len(raw), raw, 0, False, True)
    return f"{keyword}={value[:30]!r}"


# -- byte mutations on the encoded file (return data, description) ---------------------------


def _meta_end(data: bytes) -> int:
    return 132 + 12 + int.from_bytes(data[140:144], "little")


def _pixel_start(data: bytes) -> int:
    """Offset of the Pixel Data element header (its value starts 12 bytes later, 8 if implicit)."""
    try:
        raw = dcmread(BytesIO(data)).get_item(0x7FE00010)
    except Exception:  # not parseable as it is: fall back to the last tag-looking bytes
        raw = None
    if raw is not None and getattr(raw, "value_tell", None):
        implicit = _meta_values(data).get(0x0010) == ImplicitVRLittleEndian
        return int(raw.value_tell) - (8 if implicit else 12)
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > _meta_end(data) else len(data)


def _syntax_mismatch(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """The file meta names a transfer syntax the data set is not encoded in."""
    meta = dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    current = meta.TransferSyntaxUID
    if current.is_compressed:
        target = rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless])
    else:
        target = rng.choice([JPEGBaseline8Bit, RLELossless, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if target == current:
        target = ExplicitVRLittleEndian if current != ExplicitVRLittleEndian else ImplicitVRLittleEndian
    meta.TransferSyntaxUID = target
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + data[_meta_end(data) :], f"meta says {target.name}, data set is {current.name}"


def _meta_values(data: bytes) -> dict[int, str]:
    """The file meta's short text values by element number (the meta is never mutated in place)."""
    values: dict[int, str] = {}
    position = 132
    while position + 8 <= len(data) and data[position : position + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", data, position + 2)[0]
        if data[position + 4 : position + 6] in (b"OB", b"UN"):
            length = struct.unpack_from("<L", data, position + 8)[0]
            position += 12 + length
            continue
        length = struct.unpack_from("<H", data, position + 6)[0]
        values[element] = data[position + 8 : position + 8 + length].rstrip(b"\0 ").decode("ascii", "replace")
        position += 8 + length
    return values


def _truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    cut = rng.randrange(_meta_end(data), len(data))
    return data[:cut], f"cut at {cut} of {len(data)}"


def _flip(data: bytes, start: int, end: int, rng: random.Random, flips: int) -> tuple[bytes, list[int]]:
    buffer = bytearray(data)
    where = sorted(rng.randrange(start, end) for _ in range(flips)) if end > start else []
    for at in where:
        buffer[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    return bytes(buffer), where


def _header_flip(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    mutated, where = _flip(data, _meta_end(data), _pixel_start(data) + 12, rng, rng.choice([1, 2, 4, 16]))
    return mutated, f"flipped header bytes at {where[:6]}"


def _pixel_flip(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    mutated, where = _flip(data, _pixel_start(data) + 12, len(data), rng, rng.choice([1, 8, 64]))
    return mutated, f"flipped {len(where)} pixel bytes"


def _elements(data: bytes) -> list[int]:
    """Offsets of explicit-VR element headers in the header region (best effort)."""
    found = []
    position = _meta_end(data)
    end = _pixel_start(data)
    while position + 8 <= end:
        vr = data[position + 4 : position + 6]
        if not (vr.isalpha() and vr.isupper()):
            break
        found.append(position)
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV", b"SV", b"UV"):
            length = struct.unpack_from("<L", data, position + 8)[0]
            position += 12 + (0 if vr == b"SQ" or length == 0xFFFFFFFF else length)
        else:
            position += 8 + struct.unpack_from("<H", data, position + 6)[0]
    return found


def _absurd_length(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    offsets = _elements(data) or [_meta_end(data)]
    at = rng.choice(offsets)
    vr = data[at + 4 : at + 6]
    buffer = bytearray(data)
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV", b"SV", b"UV"):
        value = rng.choice([0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, len(data) * 4, 1])
        struct.pack_into("<L", buffer, at + 8, value)
    else:
        value = rng.choice([0xFFFF, 0xFFFE, 0x8001, 1])
        struct.pack_into("<H", buffer, at + 6, value)
    return bytes(buffer), f"length of element at {at} ({vr.decode('ascii', 'replace')}) set to {value:#x}"


def _sequence_blob(data: bytes, depth: int, items: int) -> bytes:
    """ReferencedImageSequence (undefined lengths) nested ``depth`` deep, ``items`` empty items at the top."""
    explicit = _meta_values(data).get(0x0010) != ImplicitVRLittleEndian
    sequence = struct.pack("<HH", 0x0008, 0x1140) + (b"SQ\0\0" if explicit else b"") + b"\xff\xff\xff\xff"
    item_open = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_close = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence_close = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    empty_items = struct.pack("<HHL", 0xFFFE, 0xE000, 0) * items
    if depth:
        return (sequence + item_open) * depth + (item_close + sequence_close) * depth
    return sequence + empty_items + sequence_close


def _insert_before_pixels(data: bytes, blob: bytes) -> bytes:
    at = _pixel_start(data)
    return data[:at] + blob + data[at:]


def _deep_sequence(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    depth = rng.choice([8, 33, 64, 200, 2000])
    return _insert_before_pixels(data, _sequence_blob(data, depth, 0)), f"sequences nested {depth} deep"


def _huge_sequence(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    items = rng.choice([1000, 20_000, 100_001, 150_000])
    return _insert_before_pixels(data, _sequence_blob(data, 0, items)), f"a sequence of {items} empty items"


_VRS = [b"FD", b"SQ", b"UN", b"OB", b"US", b"AT", b"UI", b"XX", b"\x00\x00", b"U\x01", b"OW"]


def _wrong_vr(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    offsets = _elements(data) or [_meta_end(data)]
    at = rng.choice(offsets)
    vr = rng.choice(_VRS)
    buffer = bytearray(data)
    old = bytes(buffer[at + 4 : at + 6])
    buffer[at + 4 : at + 6] = vr
    return bytes(buffer), f"VR at {at} {old!r} -> {vr!r}"


_DATASET_MUTATIONS: dict[Category, Callable[[random.Random, Dataset], str]] = {
    Category.ABSURD_GEOMETRY: _absurd_geometry,
    Category.HOSTILE_STRING: _hostile_string,
}
_BYTE_MUTATIONS: dict[Category, Callable[[random.Random, bytes], tuple[bytes, str]]] = {
    Category.TRUNCATION: _truncate,
    Category.HEADER_FLIP: _header_flip,
    Category.PIXEL_FLIP: _pixel_flip,
    Category.ABSURD_LENGTH: _absurd_length,
    Category.WRONG_VR: _wrong_vr,
    Category.SYNTAX_MISMATCH: _syntax_mismatch,
    Category.DEEP_SEQUENCE: _deep_sequence,
    Category.HUGE_SEQUENCE: _huge_sequence,
}
