"""Decode a stored instance into RGB frames for inference and for the overlay.

Every frame comes back as a C-contiguous ``uint8`` array of shape (rows, cols, 3):
multi-frame sources give one array per frame, YBR sources are converted to RGB by
pydicom, grayscale (MONOCHROME1/2) is windowed to 8 bits and repeated on three
channels, PALETTE COLOR is looked up. Compressed transfer syntaxes are decoded by the
pydicom pixel handlers with the pylibjpeg / pyjpegls plugins (shared/dicom-notes.md, 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_color_lut, apply_voi_lut

from gastrolens.dicom_io.documents.geometry import GeometryError, check_geometry
from gastrolens.errors import DecodeError

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def has_pixel_data(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames, or 1 when the attribute is absent or empty."""
    value = ds.get("NumberOfFrames")
    try:
        frames = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"NumberOfFrames {value!r} is not an integer") from exc
    if frames < 1:
        raise DecodeError(f"NumberOfFrames is {frames}")
    return frames


def read_dataset(path: Path) -> Dataset:
    """Read a stored DICOM file, translating pydicom's errors."""
    try:
        return dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise DecodeError(f"{path}: not a readable DICOM file: {exc}") from exc


def decode_rgb_frames(source: Dataset | Path) -> list[np.ndarray]:
    """All frames of ``source`` as RGB ``uint8`` arrays of shape (rows, cols, 3)."""
    ds = read_dataset(source) if isinstance(source, Path) else source
    uid = ds.get("SOPInstanceUID", "?")
    if not has_pixel_data(ds):
        raise DecodeError(f"instance {uid} has no pixel data")
    frames = number_of_frames(ds)
    if "PixelData" in ds:
        # Before the decoder allocates what the header claims (files stored before the
        # receiver checked geometry, or written by anything else).
        try:
            check_geometry(ds)
        except GeometryError as exc:
            raise DecodeError(f"instance {uid}: cannot decode pixel data: {exc}") from exc
    try:
        array = ds.pixel_array
    except Exception as exc:  # pydicom raises many types (ValueError, RuntimeError, ...)
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise DecodeError(f"instance {uid}: cannot decode pixel data (transfer syntax {ts}): {exc}") from exc
    try:
        rgb = _to_rgb(ds, array, frames)
    except (ValueError, KeyError, AttributeError) as exc:
        raise DecodeError(f"instance {uid}: cannot convert pixel data to RGB: {exc}") from exc
    return [np.ascontiguousarray(frame) for frame in rgb]


def _to_rgb(ds: Dataset, array: np.ndarray, frames: int) -> np.ndarray:
    """(frames, rows, cols, 3) uint8 from what ``pixel_array`` returned."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 1 and frames == 1 and array.ndim == 2 or samples == 3 and frames == 1 and array.ndim == 3:
        array = array[np.newaxis]
    expected = 3 if samples == 1 else 4
    if array.ndim != expected or array.shape[0] != frames:
        raise ValueError(f"pixel array of shape {array.shape} does not match {frames} frame(s)")

    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
        return _scale_to_uint8(array, int(ds.get("BitsStored", 8)) if array.dtype != np.uint8 else 8)
    if samples == 1:
        return np.repeat(_gray_to_uint8(ds, array, photometric)[..., np.newaxis], 3, axis=-1)
    if samples != 3:
        raise ValueError(f"SamplesPerPixel {samples} is neither 1 nor 3")
    # pixel_array converts YBR_FULL / YBR_FULL_422 to RGB (as_rgb=True); J2K YBR_ICT/RCT
    # and RGB need nothing more.
    return _scale_to_uint8(array, int(ds.get("BitsStored", 8)))


def _gray_to_uint8(ds: Dataset, array: np.ndarray, photometric: str) -> np.ndarray:
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"one sample per pixel with PhotometricInterpretation {photometric!r}")
    if array.dtype == np.uint8 and "WindowCenter" not in ds and "VOILUTSequence" not in ds:
        out = array
    else:
        values = apply_voi_lut(array, ds) if ("WindowCenter" in ds or "VOILUTSequence" in ds) else array
        values = values.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out = np.clip((values - lo) * scale, 0, 255).round().astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _scale_to_uint8(array: np.ndarray, bits_stored: int) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if bits_stored <= 8:
        return array.astype(np.uint8)
    shifted = array.astype(np.uint32) >> (bits_stored - 8)
    scaled: np.ndarray = np.clip(shifted, 0, 255).astype(np.uint8)
    return scaled
