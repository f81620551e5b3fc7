"""Per-batch work around the networks, done on the engine's device for a whole batch.

Host work in the hot path is what starves a GPU: per frame, field-of-view detection
in Python, a device tensor for the mean and std, a mask copied back and measured in
NumPy. Here a batch's frames travel to the device in one copy (:class:`Staging`:
one pinned buffer per batch on CUDA, one non-blocking copy), the field of view of
every frame is found there at once (:func:`fov_boxes`, the same rule as
:func:`gastrolens.models.preprocess.detect_fov`), crops are resized and normalised
there with mean/std tensors made once per device (:class:`Normaliser`), and the
masks come back measured (:func:`masks_to_host`: area and bounding box computed on
the device, every mask in one copy).

On the CPU the same code runs on CPU tensors, so its logic is tested without a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gastrolens.models.preprocess import (
    _FOV_MIN_AREA_FRACTION,
    _FOV_WORK_SIDE,
    MIN_IMAGE_SIDE,
    CropBox,
    Normalisation,
)


class Normaliser:
    """Per-channel z-score with mean and std tensors made once per device and dtype."""

    def __init__(self, normalisation: Normalisation, device: torch.device) -> None:
        self.normalisation = normalisation
        self.device = device
        self._mean = torch.tensor(normalisation.mean, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)
        self._std = torch.tensor(normalisation.std, dtype=torch.float32, device=device).reshape(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float32 in [0, 1] -> z-scores (same arithmetic as ``preprocess.normalise``)."""
        return (x - self._mean) / self._std


@dataclass(frozen=True)
class Packed:
    """A batch ready to upload: a pinned buffer and its slot (CUDA), or the frames (CPU)."""

    data: torch.Tensor | list[torch.Tensor]
    shapes: list[tuple[int, int]]
    slot: int


class Staging:
    """Moves a batch of RGB uint8 frames to the device in one copy.

    On CUDA the frames are packed into a pinned host buffer (two kept and reused in
    turn, so packing batch n+1 never overwrites a buffer whose copy is in flight) and
    sent with one non-blocking copy. On the CPU the frames are wrapped, not copied.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.copies = 0
        """How many host-to-device copies were issued (one per CUDA batch)."""

    def pack(self, frames: Sequence[np.ndarray]) -> Packed:
        """Host side (the engine's pre-processing thread): a pinned buffer holding every
        frame, or on the CPU the frames as tensors."""
        shapes = [(int(f.shape[0]), int(f.shape[1])) for f in frames]
        if not self._cuda:
            return Packed([torch.from_numpy(np.ascontiguousarray(f)) for f in frames], shapes, -1)
        total = sum(h * w * 3 for h, w in shapes)
        slot = self._turn
        self._turn = 1 - slot
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # its previous copy is complete before the buffer is reused
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < total:
            buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
            self._buffers[slot] = buffer
        host = buffer.numpy()
        offset = 0
        for frame, (h, w) in zip(frames, shapes, strict=True):
            host[offset : offset + h * w * 3].reshape(h, w, 3)[...] = frame
            offset += h * w * 3
        return Packed(buffer[:total], shapes, slot)

    def upload(self, packed: Packed) -> list[torch.Tensor]:
        """Device side: the frames as (H, W, 3) uint8 tensors on the device.

        The copy's completion is recorded on the buffer's slot, so packing the batch after
        next waits for it before reusing the buffer (the next batch may be packed before
        this one is uploaded: the slot travels with the batch).
        """
        if isinstance(packed.data, list):
            return packed.data
        flat = packed.data.to(self.device, non_blocking=True)
        self.copies += 1
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        self._events[packed.slot] = event
        frames, offset = [], 0
        for h, w in packed.shapes:
            frames.append(flat[offset : offset + h * w * 3].view(h, w, 3))
            offset += h * w * 3
        return frames


def fov_boxes(frames: Sequence[torch.Tensor], *, threshold: int) -> list[CropBox]:
    """The field of view of every frame (H, W, 3 uint8 tensors on one device), batched.

    The rule of :func:`~gastrolens.models.preprocess.detect_fov`: subsample to about
    128 px, threshold the brightest channel, open with a 3 x 3 window, keep the largest
    8-connected region (here by label propagation, every frame at once), fall back to
    the full frame when it is implausibly small. One small copy to the host per batch.
    """
    if not frames:
        return []
    device = frames[0].device
    n, side = len(frames), _FOV_WORK_SIDE
    bright = torch.zeros((n, 1, side, side), dtype=torch.float32, device=device)
    valid = torch.zeros_like(bright)
    steps = []
    for i, frame in enumerate(frames):
        rows, cols = int(frame.shape[0]), int(frame.shape[1])
        step = max(1, math.ceil(max(rows, cols) / side))
        small = frame[::step, ::step].amax(dim=2)
        h, w = small.shape
        bright[i, 0, :h, :w] = (small > threshold).to(torch.float32)
        valid[i, 0, :h, :w] = 1.0
        steps.append(step)
    # Open: erode (outside the frame counts as bright, as max_pool's padding does), then dilate.
    eroded = -F.max_pool2d(-(bright + (1.0 - valid)), 3, stride=1, padding=1) * valid
    opened = (F.max_pool2d(eroded, 3, stride=1, padding=1) * valid) > 0.5
    found = _largest_components(opened[:, 0])
    extents = _extents(found).cpu().tolist()  # the one synchronisation: crop sizes shape the next tensors
    boxes = []
    for frame, step, (any_set, top, left, bottom, right) in zip(frames, steps, extents, strict=True):
        rows, cols = int(frame.shape[0]), int(frame.shape[1])
        if not any_set:
            boxes.append(CropBox(0, 0, rows, cols))
            continue
        box = CropBox(max(0, top * step - step), max(0, left * step - step),
                      min(rows, bottom * step + step), min(cols, right * step + step))
        if box.height * box.width < _FOV_MIN_AREA_FRACTION * rows * cols or min(box.height, box.width) < MIN_IMAGE_SIDE:
            box = CropBox(0, 0, rows, cols)
        boxes.append(box)
    return boxes


def _largest_components(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> the largest 8-connected region of each mask (ties: the highest label).

    Every set pixel starts with its own label; the largest label spreads along rows and
    columns in one step each (a segmented running maximum per run of set pixels) and
    across diagonals with a 3 x 3 maximum, until nothing changes. Convex regions such
    as a field of view settle in two or three rounds.
    """
    n, h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.int64, device=mask.device).reshape(1, h, w) * mask
    for _ in range(h * w):  # converges long before; bounded for safety
        spread = _run_max(labels, mask)
        spread = _run_max(spread.transpose(1, 2), mask.transpose(1, 2)).transpose(1, 2)
        spread = F.max_pool2d(spread[:, None].to(torch.float32), 3, stride=1, padding=1)[:, 0].to(torch.int64) * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    flat = labels.reshape(n, -1)
    offsets = torch.arange(n, device=mask.device).reshape(n, 1) * (h * w + 1)
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=n * (h * w + 1)).reshape(n, h * w + 1)
    counts[:, 0] = 0
    winner = h * w - torch.argmax(counts.flip(1), dim=1)
    present = counts.amax(dim=1) > 0
    return (flat == winner[:, None]).reshape(n, h, w) & present[:, None, None]


def _run_max(labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The largest label of each horizontal run of set pixels, written over the whole run.

    A running maximum of ``run number * big + label`` cannot leak between runs, because
    later runs carry larger keys; once forwards and once backwards gives the run's maximum.
    """
    big = labels.shape[-1] * labels.shape[-2] + 1

    def forward(lab: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        starts = on.clone()
        starts[..., 1:] &= ~on[..., :-1]
        run = torch.cumsum(starts, dim=-1)
        return torch.cummax(run * big + lab, dim=-1).values % big

    ahead = forward(labels, keep)
    behind = forward(labels.flip(-1), keep.flip(-1)).flip(-1)
    return torch.maximum(ahead, behind) * keep


def _extents(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 5) int64: any, top, left, bottom, right (exclusive)."""
    rows = mask.any(dim=2)
    cols = mask.any(dim=1)
    h, w = mask.shape[1:]
    top = torch.argmax(rows.to(torch.uint8), dim=1)
    bottom = h - torch.argmax(rows.flip(1).to(torch.uint8), dim=1)
    left = torch.argmax(cols.to(torch.uint8), dim=1)
    right = w - torch.argmax(cols.flip(1).to(torch.uint8), dim=1)
    return torch.stack([rows.any(dim=1).to(torch.int64), top, left, bottom, right], dim=1)


def network_inputs(
    frames: Sequence[torch.Tensor], boxes: Sequence[CropBox], sizes: Sequence[int], normaliser: Normaliser
) -> list[torch.Tensor]:
    """Crop, resize (bilinear, antialiased) and normalise every frame for each input size.

    Returns one (N, 3, S, S) float32 batch per entry of ``sizes``.
    """
    batches: list[list[torch.Tensor]] = [[] for _ in sizes]
    for frame, box in zip(frames, boxes, strict=True):
        crop = frame[box.top : box.bottom, box.left : box.right]
        image = crop.permute(2, 0, 1).to(torch.float32).div_(255.0)[None]
        for batch, size in zip(batches, sizes, strict=True):
            resized = image
            if image.shape[-2:] != (size, size):
                resized = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            batch.append(resized)
    return [normaliser(torch.cat(batch)) for batch in batches]


@dataclass(frozen=True)
class MeasuredMask:
    """One frame's lesion mask at source resolution, measured on the device."""

    mask: np.ndarray
    pixels: int
    bbox: tuple[int, int, int, int] | None


def masks_to_host(
    logits: torch.Tensor, boxes: Sequence[CropBox], shapes: Sequence[tuple[int, int]], *, threshold: float
) -> list[MeasuredMask]:
    """Lesion logits (N, 1, S, S) -> boolean masks of the source frames, counted and boxed.

    Each mask is upsampled to its crop box (bilinear, as :func:`mask_to_source`) and
    thresholded on the device; the pixel counts, the bounding boxes and every mask's
    bytes come back in one copy (pinned, non-blocking on CUDA).
    """
    inside: list[torch.Tensor] = []
    stats: list[torch.Tensor] = []
    for i, box in enumerate(boxes):
        x = logits[i : i + 1, :1].to(torch.float32)
        mask = F.interpolate(x, size=(box.height, box.width), mode="bilinear", align_corners=False)[0, 0] > threshold
        inside.append(mask.reshape(-1))
        extent = _extents(mask[None])[0]
        stats.append(torch.cat([mask.sum().reshape(1), extent]))
    payload = torch.cat([torch.stack(stats).reshape(-1).to(torch.int64).view(torch.uint8),
                         torch.cat(inside).view(torch.uint8)])
    if payload.device.type == "cuda":
        host = torch.empty(payload.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        torch.cuda.current_stream(payload.device).synchronize()
    else:
        host = payload
    data = host.numpy()
    n = len(boxes)
    numbers = data[: n * 6 * 8].view(np.int64).reshape(n, 6)
    offset = n * 6 * 8
    measured = []
    for (count, any_set, top, left, bottom, right), box, (rows, cols) in zip(numbers.tolist(), boxes, shapes,
                                                                              strict=True):
        size = box.height * box.width
        full = np.zeros((rows, cols), dtype=bool)
        full[box.top : box.bottom, box.left : box.right] = data[offset : offset + size].view(bool).reshape(
            box.height, box.width)
        offset += size
        bbox = (box.top + top, box.left + left, box.top + bottom, box.left + right) if any_set else None
        measured.append(MeasuredMask(full, int(count), bbox))
    return measured


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad a batch with zero inputs to ``size`` rows, so every chunk has one shape.

    Kernels (cuDNN's especially) may pick different algorithms, and so round
    differently, for different batch shapes; a fixed shape keeps an image's result
    independent of how many others share its chunk.
    """
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))])
