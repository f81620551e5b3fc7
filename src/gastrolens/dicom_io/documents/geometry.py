"""Check an image's declared geometry against the bytes that carry it, before decoding.

A header may claim 65535 x 65535 pixels or 2**31 - 1 frames in a few hundred bytes.
Decoders allocate what the header claims, so a hostile or broken peer could make the
daemon reserve gigabytes for a file of kilobytes. :func:`check_geometry` compares
Rows x Columns x SamplesPerPixel x NumberOfFrames x BitsAllocated with the Pixel Data
length (native transfer syntaxes) or with the fragments and offset table
(encapsulated), and caps what one frame and all frames may decode to. It reads only
the header and walks the fragment item headers; it never decodes pixels. The
receiver calls it before storing (``dicom_io.net.inspect``) and the decoder before
``pixel_array`` (``dicom_io.documents.read``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

MIB = 2**20

_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_ALLOWED_BITS = (1, 8, 16, 32, 64)
_VIDEO_SYNTAXES = frozenset(UID(f"1.2.840.10008.1.2.4.{n}") for n in range(100, 109))


class GeometryError(ValueError):
    """The declared geometry does not fit the pixel data or the limits; ``str()`` says why."""


@dataclass(frozen=True, kw_only=True)
class GeometryLimits:
    """How much decoded pixel memory one image may cost."""

    max_frame_bytes: int = 64 * MIB
    """Decoded size of one frame (64 MiB: 4 k x 4 k RGB fits, 65535 x 65535 does not)."""
    max_decoded_bytes: int = 1024 * MIB
    """Decoded size of all frames together (the decoder keeps every frame of an image)."""


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """The declared geometry once it has been found consistent."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    frames: int
    encapsulated: bool
    video: bool
    """MPEG-2 / H.264 / HEVC: a stream of many frames may sit in one fragment."""

    @property
    def frame_bytes(self) -> int:
        """Bytes one decoded frame occupies (bit-packed for BitsAllocated 1)."""
        return (self.rows * self.columns * self.samples_per_pixel * self.bits_allocated + 7) // 8

    @property
    def decoded_bytes(self) -> int:
        return self.frame_bytes * self.frames


def check_geometry(ds: Dataset, *, limits: GeometryLimits = GeometryLimits()) -> Geometry:
    """The geometry of ``ds`` or :class:`GeometryError` naming the first inconsistency.

    ``ds`` must hold its Pixel Data (as read by ``dcmread`` without ``defer_size``).
    """
    syntax = _syntax(ds)
    pixel_data = ds.get("PixelData")
    if pixel_data is None:
        raise GeometryError("no Pixel Data")
    data = bytes(pixel_data) if not isinstance(pixel_data, bytes) else pixel_data
    geometry = Geometry(
        rows=_positive(ds, "Rows"),
        columns=_positive(ds, "Columns"),
        samples_per_pixel=_positive(ds, "SamplesPerPixel", default=1),
        bits_allocated=_positive(ds, "BitsAllocated"),
        frames=_positive(ds, "NumberOfFrames", default=1),
        encapsulated=_is_encapsulated(syntax),
        video=syntax in _VIDEO_SYNTAXES,
    )
    if geometry.samples_per_pixel not in (1, 3, 4):
        raise GeometryError(f"SamplesPerPixel {geometry.samples_per_pixel} is not 1, 3 or 4")
    if geometry.bits_allocated not in _ALLOWED_BITS:
        raise GeometryError(f"BitsAllocated {geometry.bits_allocated} is not one of {_ALLOWED_BITS}")
    if geometry.frame_bytes > limits.max_frame_bytes:
        raise GeometryError(
            f"one frame of {geometry.rows} x {geometry.columns} x {geometry.samples_per_pixel} samples x "
            f"{geometry.bits_allocated} bits would decode to {geometry.frame_bytes} bytes, "
            f"more than the {limits.max_frame_bytes} allowed"
        )
    if geometry.encapsulated:
        _check_encapsulated(geometry, data)
    else:
        _check_native(geometry, len(data), str(ds.get("PhotometricInterpretation", "")).strip())
    if geometry.decoded_bytes > limits.max_decoded_bytes:
        raise GeometryError(
            f"{geometry.frames} frames of {geometry.frame_bytes} bytes would decode to {geometry.decoded_bytes} bytes, "
            f"more than the {limits.max_decoded_bytes} allowed"
        )
    return geometry


def _positive(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise GeometryError(f"{keyword} is missing")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{keyword} {str(value)[:40]!r} is not an integer") from exc
    if number < 1:
        raise GeometryError(f"{keyword} is {number}")
    return number


def _syntax(ds: Dataset) -> UID:
    """The transfer syntax from the file meta (implicit VR little endian when absent)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(syntax)) if syntax else UID("1.2.840.10008.1.2")


def _is_encapsulated(syntax: UID) -> bool:
    try:
        return bool(syntax.is_encapsulated)
    except ValueError as exc:
        raise GeometryError(f"transfer syntax {str(syntax)[:64]!r} is unknown") from exc


def _check_native(geometry: Geometry, length: int, photometric: str) -> None:
    samples = geometry.samples_per_pixel
    if photometric == "YBR_FULL_422" and samples == 3:
        samples = 2  # two luminance values share one Cb and one Cr (PS3.3 C.7.6.3.1.2)
    needed = (geometry.rows * geometry.columns * samples * geometry.bits_allocated * geometry.frames + 7) // 8
    if length < needed:
        raise GeometryError(
            f"{geometry.frames} frame(s) of {geometry.rows} x {geometry.columns} x {geometry.samples_per_pixel} "
            f"samples x {geometry.bits_allocated} bits need {needed} bytes of Pixel Data, it holds {length}"
        )


def _check_encapsulated(geometry: Geometry, data: bytes) -> None:
    offsets, fragments = _walk_items(data)
    if fragments < 1:
        raise GeometryError("encapsulated Pixel Data holds no fragment")
    if offsets and len(offsets) != geometry.frames:
        raise GeometryError(
            f"the Basic Offset Table lists {len(offsets)} frame(s), NumberOfFrames says {geometry.frames}"
        )
    if geometry.frames > fragments and not geometry.video:
        raise GeometryError(
            f"NumberOfFrames {geometry.frames} is more than the {fragments} fragment(s) of the encapsulated Pixel Data"
        )


def _walk_items(data: bytes) -> tuple[list[int], int]:
    """The Basic Offset Table and the number of fragments after it; every item must fit."""
    view = memoryview(data)
    position = 0
    offsets: list[int] | None = None
    fragments = 0
    while position + 8 <= len(view):
        tag_group, tag_element, length = struct.unpack_from("<HHL", view, position)
        tag = tag_group << 16 | tag_element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise GeometryError(
                f"encapsulated Pixel Data has tag ({tag_group:04X},{tag_element:04X}) "
                f"at offset {position} where an item should be"
            )
        if length == 0xFFFFFFFF or position + 8 + length > len(view):
            raise GeometryError(
                f"encapsulated Pixel Data item at offset {position} claims {length} bytes, "
                f"only {len(view) - position - 8} follow"
            )
        if offsets is None:
            if length % 4:
                raise GeometryError("the Basic Offset Table's length is not a multiple of 4")
            offsets = list(struct.unpack_from(f"<{length // 4}L", view, position + 8))
        else:
            fragments += 1
        position += 8 + length
    if offsets is None:
        raise GeometryError("encapsulated Pixel Data has no Basic Offset Table item")
    return offsets, fragments
