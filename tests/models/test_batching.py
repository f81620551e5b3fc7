"""Per-batch work on the engine's device, checked on CPU tensors against the host reference."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from gastrolens.models.batching import (
    Normaliser,
    Staging,
    fov_boxes,
    masks_to_host,
    network_inputs,
    pad_batch,
)
from gastrolens.models.decision import bounding_box
from gastrolens.models.preprocess import (
    STUDY_NORMALISATION,
    CropBox,
    Preset,
    detect_fov,
    mask_to_source,
    normalise,
    to_float_tensor,
)
from gastrolens.samples import endoscopy_frame

Frame = Callable[..., tuple[np.ndarray, np.ndarray]]


def _frames(make_frame: Frame) -> list[np.ndarray]:
    frames = [make_frame(200 + 7 * i, 300 + 11 * i, (20, 110, 180 + i, 270 + i), octagon=i % 2 == 0, seed=i)[0]
              for i in range(6)]
    rng = np.random.default_rng(0)
    frames.append(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))  # bright noise: one big region
    frames.append(rng.integers(0, 30, (150, 100, 3), dtype=np.uint8))  # speckles: falls back to the frame
    frames.append(np.zeros((64, 80, 3), np.uint8))  # nothing bright at all
    frames.append(endoscopy_frame(540, 675, None, seed=3)[0])
    two = np.zeros((120, 200, 3), np.uint8)  # two regions: the larger wins
    two[10:60, 10:60] = 200
    two[20:110, 100:190] = 200
    frames.append(two)
    return frames


def test_fov_boxes_match_the_host_rule_for_a_whole_batch(make_frame: Frame) -> None:
    frames = _frames(make_frame)
    boxes = fov_boxes([torch.from_numpy(f) for f in frames], threshold=20)
    assert boxes == [detect_fov(f) for f in frames]
    assert boxes[-1].left >= 90  # the larger of two regions
    assert boxes[-3] == CropBox(0, 0, 64, 80)


def test_fov_threshold_is_honoured(make_frame: Frame) -> None:
    frame = np.full((100, 100, 3), 50, np.uint8)
    frame[:, :30] = 10
    (box,) = fov_boxes([torch.from_numpy(frame)], threshold=20)
    assert box == detect_fov(frame, threshold=20) and box.left > 20
    assert fov_boxes([torch.from_numpy(frame)], threshold=60) == [CropBox(0, 0, 100, 100)]


def test_normaliser_makes_its_tensors_once_and_matches_normalise() -> None:
    normaliser = Normaliser(STUDY_NORMALISATION, torch.device("cpu"))
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(normaliser(x), normalise(x))
    mean_before = normaliser._mean.data_ptr()
    normaliser(torch.rand(2, 3, 4, 4))
    assert normaliser._mean.data_ptr() == mean_before


def test_network_inputs_equal_the_preset_per_image(make_frame: Frame) -> None:
    frames = _frames(make_frame)[:4]
    boxes = [detect_fov(f) for f in frames]
    classifier, segmenter = network_inputs([torch.from_numpy(f) for f in frames], boxes, [64, 65],
                                           Normaliser(STUDY_NORMALISATION, torch.device("cpu")))
    assert classifier.shape == (4, 3, 64, 64) and segmenter.shape == (4, 3, 65, 65)
    for i, (frame, box) in enumerate(zip(frames, boxes, strict=True)):
        image = to_float_tensor(box.crop(frame))
        assert torch.equal(classifier[i], Preset(64).finish(image))
        assert torch.equal(segmenter[i], Preset(65).finish(image))


def test_masks_are_measured_like_the_host_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 17, 17) * 3
    logits[1] = -10.0  # an empty mask
    boxes = [CropBox(5, 7, 45, 60), CropBox(0, 0, 30, 30), CropBox(10, 0, 50, 40)]
    shapes = [(50, 70), (30, 30), (60, 40)]
    measured = masks_to_host(logits, boxes, shapes, threshold=0.5)
    for got, logit, box, shape in zip(measured, logits, boxes, shapes, strict=True):
        expected = mask_to_source(logit, box, shape, threshold=0.5)
        assert np.array_equal(got.mask, expected)
        assert got.pixels == int(expected.sum())
        assert got.bbox == bounding_box(expected)
    assert measured[1].pixels == 0 and measured[1].bbox is None


def test_staging_on_the_cpu_wraps_without_copying() -> None:
    staging = Staging(torch.device("cpu"))
    frames = [np.zeros((40, 50, 3), np.uint8), np.ones((33, 35, 3), np.uint8)]
    packed = staging.pack(frames)
    assert packed.shapes == [(40, 50), (33, 35)]
    uploaded = staging.upload(packed)
    assert [t.shape for t in uploaded] == [(40, 50, 3), (33, 35, 3)]
    assert uploaded[0].data_ptr() == frames[0].__array_interface__["data"][0]
    assert staging.copies == 0


def test_pad_batch_fills_with_zero_inputs_to_one_shape() -> None:
    x = torch.ones(3, 2, 4, 4)
    padded = pad_batch(x, 5)
    assert padded.shape == (5, 2, 4, 4)
    assert torch.equal(padded[:3], x) and not padded[3:].any()
    assert pad_batch(x, 3) is x


@pytest.mark.parametrize("frames", [1, 3])
def test_fov_boxes_for_small_batches(make_frame: Frame, frames: int) -> None:
    images = _frames(make_frame)[:frames]
    assert fov_boxes([torch.from_numpy(f) for f in images], threshold=20) == [detect_fov(f) for f in images]
    assert fov_boxes([], threshold=20) == []
