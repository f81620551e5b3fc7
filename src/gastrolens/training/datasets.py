"""Streaming torch datasets: every image is read from disk when it is asked for.

Nothing is cached, so memory does not grow with the data set: a DataLoader holds only
the batches its workers are preparing. PNG and JPEG are read with Pillow, DICOM with
``gastrolens.dicom_io.documents.read`` (the daemon's own decoder: YBR, palette and grayscale
become RGB exactly as in production). Masks are PNGs; any non-zero pixel is lesion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from gastrolens.errors import DatasetError, DecodeError
from gastrolens.findings import CLASS_ORDER

if TYPE_CHECKING:
    from gastrolens.training.manifest import ManifestRow

_DICOM_MAGIC_OFFSET = 128


class ImageReadError(Exception):
    """An image or mask file cannot be read (the manifest turns it into a row problem)."""


def is_dicom(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble, or is named ``*.dcm``."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(_DICOM_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def image_shape(path: Path) -> tuple[int, int]:
    """(rows, cols) from the file's header, without decoding pixels."""
    if is_dicom(path):
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise ImageReadError(f"not a readable DICOM file ({exc})") from exc
        if "Rows" not in ds or "Columns" not in ds:
            raise ImageReadError("DICOM file has no Rows / Columns (not an image)")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames != 1:
            raise ImageReadError(f"DICOM file has {frames} frames; export single frames for training")
        return int(ds.Rows), int(ds.Columns)
    try:
        with Image.open(path) as img:
            if img.format not in ("PNG", "JPEG"):
                raise ImageReadError(f"{img.format} image; use PNG, JPEG or DICOM")
            return int(img.height), int(img.width)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"not a readable PNG / JPEG image ({exc})") from exc


def mask_shape(path: Path) -> tuple[int, int]:
    """(rows, cols) of a PNG mask, from its header."""
    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                raise ImageReadError(f"mask is {img.format}, not PNG")
            return int(img.height), int(img.width)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"not a readable PNG mask ({exc})") from exc


def read_rgb(path: Path) -> np.ndarray:
    """The image as RGB uint8 (rows, cols, 3)."""
    if is_dicom(path):
        from gastrolens.dicom_io.documents.read import decode_rgb_frames

        try:
            frames = decode_rgb_frames(path)
        except DecodeError as exc:
            raise DatasetError(f"{path}: {exc}") from exc
        return frames[0]
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "I;16", "I;16B", "F"):
                raise DatasetError(f"{path}: {img.mode} (16-bit or float) images are not supported; use 8-bit RGB")
            return np.asarray(img.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{path}: cannot read image ({exc})") from exc


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Boolean lesion mask; an all-False one of ``shape`` when ``path`` is None."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    try:
        with Image.open(path) as img:
            array: Any = np.asarray(img)  # 2-D or 3-D until reduced to a mask below
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{path}: cannot read mask ({exc})") from exc
    if array.ndim == 3:
        array = array.any(axis=2)
    mask = array != 0
    if mask.shape != tuple(shape):
        raise DatasetError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, image is {shape[0]}x{shape[1]}")
    return mask


Sample = tuple[np.ndarray, np.ndarray]
Transform = Callable[[np.ndarray, np.ndarray | None], tuple[torch.Tensor, torch.Tensor | None]]


class ClassificationDataset(Dataset[tuple[torch.Tensor, int]]):
    """(network input, class index) per manifest row; images read on demand."""

    def __init__(self, rows: Sequence[ManifestRow], transform: Transform) -> None:
        self.rows = list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        image, _ = self.transform(read_rgb(row.image), None)
        return image, CLASS_ORDER.index(row.label)


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(network input, float lesion mask (1, S, S)) per row with a known mask."""

    def __init__(self, rows: Sequence[ManifestRow], transform: Transform) -> None:
        unknown = [row.line for row in rows if not row.has_mask_truth]
        if unknown:
            raise DatasetError(f"rows without a known mask cannot train the segmenter (lines {unknown[:10]})")
        self.rows = list(rows)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[index]
        rgb = read_rgb(row.image)
        image, mask = self.transform(rgb, read_mask(row.mask, rgb.shape[:2]))
        assert mask is not None  # the transform returns the mask it was given
        return image, mask.to(torch.float32)[None]
