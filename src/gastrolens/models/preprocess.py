"""Pre-processing shared by training and inference: one preset, used by both.

The study's recipe (paper.md): RGB uint8 -> float in [0, 1] -> resize to the network's
square input -> per-channel z-score with the study's mean and std. Endoscopy frames
carry a black border with burned-in text around a round or octagonal field of view
(FOV); we crop to the FOV first so that the network sees mucosa, not patient names,
and so that the lesion mask maps back into full-frame coordinates exactly.

Training code uses the same pieces in the same order, through a :class:`Preset` made
from the model card (``card.preset("classifier")``)::

    box = preset.crop_box(rgb)                 # the FOV, or the full frame when the crop is off
    image = to_float_tensor(box.crop(rgb))     # C,H,W float in [0, 1]
    mask = box.crop(lesion_mask)               # keep image and mask aligned
    ... augmentation on the float tensor ...
    x = preset.finish(image)                   # resize + z-score: what the network sees

and ``preset(rgb)`` does exactly that without augmentation. The engine runs the same
functions on the GPU for whole batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gastrolens.errors import ModelError

STUDY_MEAN: tuple[float, float, float] = (0.34403, 0.18075, 0.13959)
"""Per-channel RGB mean of the study's training images (paper.md)."""
STUDY_STD: tuple[float, float, float] = (0.12930, 0.09520, 0.07852)
"""Per-channel RGB standard deviation of the study's training images (paper.md)."""

CLASSIFIER_INPUT_SIZE = 512
"""The study resized classification inputs to 512 x 512."""
SEGMENTER_INPUT_SIZE = 513
"""The study cropped segmentation inputs to 513 x 513."""

MIN_IMAGE_SIDE = 32
MAX_IMAGE_SIDE = 8192

FOV_THRESHOLD = 20
"""A pixel whose brightest channel is above this (0-255) may belong to the FOV."""
_FOV_WORK_SIDE = 128
"""FOV detection runs on a copy subsampled to about this many pixels on the long side."""
_FOV_MIN_AREA_FRACTION = 0.10
"""A detected FOV smaller than this part of the frame is not trusted: use the full frame."""


@dataclass(frozen=True)
class Normalisation:
    """Per-channel z-score applied to RGB in [0, 1]."""

    mean: tuple[float, float, float] = STUDY_MEAN
    std: tuple[float, float, float] = STUDY_STD

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise ValueError(f"normalisation {name} must be three finite numbers, got {value!r}")
        if min(self.std) <= 0:
            raise ValueError(f"normalisation std must be positive, got {self.std!r}")


STUDY_NORMALISATION = Normalisation()


@dataclass(frozen=True)
class CropBox:
    """A rectangle of a frame: rows ``top:bottom``, columns ``left:right`` (exclusive)."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The box's part of an image or mask (a view, no copy)."""
        return array[self.top : self.bottom, self.left : self.right]


def validate_image(image: object, *, index: int | None = None) -> np.ndarray:
    """Check that ``image`` is an RGB uint8 frame the networks can take; return it.

    The daemon calls this per frame before batching, so one bad frame fails alone.
    """
    where = "image" if index is None else f"image {index}"
    if not isinstance(image, np.ndarray):
        raise ModelError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ModelError(f"{where}: grayscale array of shape {image.shape}; an RGB array (rows, cols, 3) is required")
    if image.ndim != 3 or image.shape[2] != 3:
        kind = "RGBA" if image.ndim == 3 and image.shape[2] == 4 else "unsupported"
        raise ModelError(f"{where}: {kind} array of shape {image.shape}; an RGB array (rows, cols, 3) is required")
    if image.dtype != np.uint8:
        raise ModelError(f"{where}: dtype {image.dtype}; RGB uint8 is required")
    rows, cols = image.shape[:2]
    if min(rows, cols) < MIN_IMAGE_SIDE:
        raise ModelError(f"{where}: {rows}x{cols} pixels is smaller than {MIN_IMAGE_SIDE} px on a side")
    if max(rows, cols) > MAX_IMAGE_SIDE:
        raise ModelError(f"{where}: {rows}x{cols} pixels is larger than {MAX_IMAGE_SIDE} px on a side")
    return image


def full_frame(image: np.ndarray) -> CropBox:
    """The box covering the whole frame (FOV crop switched off)."""
    return CropBox(0, 0, int(image.shape[0]), int(image.shape[1]))


def detect_fov(image: np.ndarray, *, threshold: int = FOV_THRESHOLD) -> CropBox:
    """Find the endoscope's field of view: the bounding box of the largest bright region.

    Works on a subsampled copy: threshold the brightest channel, open (erode then
    dilate) to wipe out thin burned-in text, keep the largest connected region. Dark
    lumen inside the FOV does not matter because the region's bounding box spans it.
    Falls back to the full frame when nothing plausible is found.
    """
    rows, cols = image.shape[:2]
    step = max(1, math.ceil(max(rows, cols) / _FOV_WORK_SIDE))
    small = torch.from_numpy(np.ascontiguousarray(image[::step, ::step].max(axis=2)))
    bright = (small > threshold).to(torch.float32)[None, None]
    kernel = max(3, (max(bright.shape[-2:]) // 40) | 1)
    opened = (_dilate(_erode(bright, kernel), kernel)[0, 0] > 0.5).numpy()
    region = _largest_component(opened)
    if region is None:
        return full_frame(image)
    top, left, bottom, right = region
    box = CropBox(
        max(0, top * step - step),
        max(0, left * step - step),
        min(rows, bottom * step + step),
        min(cols, right * step + step),
    )
    if box.height * box.width < _FOV_MIN_AREA_FRACTION * rows * cols or min(box.height, box.width) < MIN_IMAGE_SIDE:
        return full_frame(image)
    return box


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -F.max_pool2d(-x, k, stride=1, padding=k // 2)


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(x, k, stride=1, padding=k // 2)


def _largest_component(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (top, left, bottom, right; exclusive) of the largest 8-connected region.

    Run-length labelling: runs of set pixels per row, joined with a union-find when they
    touch a run of the row above (diagonals count). The working copy is small, so
    there are only a few hundred runs.
    """
    runs: list[tuple[int, int, int]] = []  # (row, first col, last col + 1)
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []
    for row in range(mask.shape[0]):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[row].astype(np.int8), [0]))))
        current = []
        for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            index = len(runs)
            runs.append((row, start, stop))
            parent.append(index)
            for other in previous:
                _, other_start, other_stop = runs[other]
                if other_start <= stop and start <= other_stop:  # overlap or diagonal touch
                    parent[find(other)] = find(index)
            current.append(index)
        previous = current
    if not runs:
        return None
    sizes: dict[int, int] = {}
    for index, (_, start, stop) in enumerate(runs):
        root = find(index)
        sizes[root] = sizes.get(root, 0) + stop - start
    winner = max(sizes, key=lambda root: sizes[root])
    members = [runs[i] for i in range(len(runs)) if find(i) == winner]
    return (
        min(r[0] for r in members),
        min(r[1] for r in members),
        max(r[0] for r in members) + 1,
        max(r[2] for r in members),
    )


def to_float_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """RGB uint8 (rows, cols, 3) -> float32 (3, rows, cols) in [0, 1], on the input's device."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    return tensor.permute(2, 0, 1).to(torch.float32).div_(255.0)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (C, H, W) or (N, C, H, W) floats to ``size`` x ``size``, bilinear with antialiasing.

    Antialiasing matters: frames of 1280 px and more shrink to 512 px.
    """
    batched = image.dim() == 4
    x = image if batched else image[None]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x if batched else x[0]


def normalise(image: torch.Tensor, normalisation: Normalisation = STUDY_NORMALISATION) -> torch.Tensor:
    """Per-channel z-score of (C, H, W) or (N, C, H, W) floats in [0, 1]."""
    shape = (3, 1, 1)
    mean = torch.tensor(normalisation.mean, dtype=image.dtype, device=image.device).reshape(shape)
    std = torch.tensor(normalisation.std, dtype=image.dtype, device=image.device).reshape(shape)
    return (image - mean) / std


@dataclass(frozen=True)
class Preset:
    """One network's input recipe. Training and inference build it from the same model card.

    Training: ``box = preset.crop_box(rgb)``, crop image and mask with ``box.crop``,
    augment the float tensor from :func:`to_float_tensor`, then ``preset.finish(x)``.
    Inference: ``preset(rgb)``.
    """

    size: int
    normalisation: Normalisation = STUDY_NORMALISATION
    fov_crop: bool = True
    fov_threshold: int = FOV_THRESHOLD

    def crop_box(self, image: np.ndarray) -> CropBox:
        """The field of view (or the full frame when the crop is off)."""
        return detect_fov(image, threshold=self.fov_threshold) if self.fov_crop else full_frame(image)

    def finish(self, image: torch.Tensor) -> torch.Tensor:
        """Float RGB in [0, 1], (C, H, W) or (N, C, H, W), any size -> the network's input."""
        return normalise(resize(image, self.size), self.normalisation)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, CropBox]:
        """One frame -> (3, size, size) network input and the crop box used."""
        validate_image(image)
        box = self.crop_box(image)
        return self.finish(to_float_tensor(box.crop(image))), box


def prepare(
    image: np.ndarray,
    size: int,
    *,
    fov_crop: bool = True,
    normalisation: Normalisation = STUDY_NORMALISATION,
) -> tuple[torch.Tensor, CropBox]:
    """One frame to one network input (3, size, size) plus the crop box used."""
    return Preset(size, normalisation, fov_crop)(image)


def mask_to_source(
    logits: torch.Tensor,
    box: CropBox,
    source_shape: Sequence[int],
    *,
    threshold: float = 0.0,
) -> np.ndarray:
    """Map one segmentation output back to a boolean mask of the whole source frame.

    ``logits`` is (S, S) or (1, S, S) at the network's input size and covers ``box``.
    It is resized to the box (bilinear), thresholded (``threshold`` is a logit: 0.0 is
    probability 0.5) and placed into an all-False frame of ``source_shape[:2]``.
    """
    x = logits.reshape(1, 1, *logits.shape[-2:]).to(torch.float32)
    x = F.interpolate(x, size=(box.height, box.width), mode="bilinear", align_corners=False)
    inside = (x[0, 0] > threshold).cpu().numpy()
    mask = np.zeros(tuple(int(s) for s in source_shape[:2]), dtype=bool)
    mask[box.top : box.bottom, box.left : box.right] = inside
    return mask


def probability_to_logit(probability: float) -> float:
    """The logit whose sigmoid is ``probability`` (thresholds are given as probabilities)."""
    p = min(max(probability, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))
