"""Pre-processing: constants, input checks, field-of-view crop and mask back-mapping."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from gastrolens.errors import ModelError
from gastrolens.models import preprocess
from gastrolens.models.preprocess import (
    STUDY_MEAN,
    STUDY_STD,
    CropBox,
    Normalisation,
    Preset,
    detect_fov,
    mask_to_source,
    normalise,
    prepare,
    probability_to_logit,
    resize,
    to_float_tensor,
    validate_image,
)


def test_study_constants() -> None:
    assert STUDY_MEAN == (0.34403, 0.18075, 0.13959)
    assert STUDY_STD == (0.12930, 0.09520, 0.07852)
    assert preprocess.CLASSIFIER_INPUT_SIZE == 512
    assert preprocess.SEGMENTER_INPUT_SIZE == 513


def test_normalisation_maps_study_mean_to_zero_and_one_std_to_one() -> None:
    mean = torch.tensor(STUDY_MEAN).reshape(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(normalise(mean), torch.zeros(3, 4, 4), atol=1e-6)
    plus_one = mean + torch.tensor(STUDY_STD).reshape(3, 1, 1)
    assert torch.allclose(normalise(plus_one), torch.ones(3, 4, 4), atol=1e-5)


def test_normalisation_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="std must be positive"):
        Normalisation(std=(0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="three finite"):
        Normalisation(mean=(0.1, float("nan"), 0.1))


def test_float_tensor_and_resize() -> None:
    image = np.full((40, 60, 3), 255, dtype=np.uint8)
    tensor = to_float_tensor(image)
    assert tensor.shape == (3, 40, 60) and tensor.dtype == torch.float32
    assert float(tensor.max()) == 1.0
    assert resize(tensor, 33).shape == (3, 33, 33)
    assert resize(tensor[None], 33).shape == (1, 3, 33, 33)


def test_prepare_gives_normalised_network_input() -> None:
    colour = np.round(np.array(STUDY_MEAN) * 255).astype(np.uint8)
    image = np.broadcast_to(colour, (100, 80, 3)).copy()
    x, box = prepare(image, 64, fov_crop=False)
    assert x.shape == (3, 64, 64)
    assert box == CropBox(0, 0, 100, 80)
    assert float(x.abs().max()) < 0.05


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((64, 64), np.uint8), "grayscale"),
        (np.zeros((64, 64, 1), np.uint8), "grayscale"),
        (np.zeros((64, 64, 4), np.uint8), "RGBA"),
        (np.zeros((64, 64, 3), np.float32), "dtype float32"),
        (np.zeros((31, 64, 3), np.uint8), "smaller than 32"),
        (np.zeros((8193, 32, 3), np.uint8), "larger than 8192"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_validate_image_rejects_bad_input(image: object, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        validate_image(image, index=3)
    with pytest.raises(ModelError, match="image 3"):
        validate_image(image, index=3)


@pytest.mark.parametrize(
    ("rows", "cols", "fov", "octagon"),
    [
        (1080, 1350, (40, 400, 1040, 1330), True),
        (480, 640, (20, 180, 460, 630), False),
        (200, 300, (20, 110, 180, 270), True),
    ],
)
def test_detect_fov_finds_the_field_of_view(
    make_frame: Callable[..., tuple[np.ndarray, np.ndarray]], rows: int, cols: int, fov: tuple[int, int, int, int],
    octagon: bool,
) -> None:
    image, inside = make_frame(rows, cols, fov, octagon=octagon)
    true = _bbox(inside)
    box = detect_fov(image)
    tolerance = 2 * max(1, -(-max(rows, cols) // 128))  # two cells of the working copy
    assert box.top <= true[0] and box.left <= true[1] and box.bottom >= true[2] and box.right >= true[3]
    assert true[0] - box.top <= tolerance and true[1] - box.left <= tolerance
    assert box.bottom - true[2] <= tolerance and box.right - true[3] <= tolerance


def test_detect_fov_falls_back_to_the_full_frame() -> None:
    black = np.zeros((100, 120, 3), np.uint8)
    assert detect_fov(black) == CropBox(0, 0, 100, 120)
    bright = np.full((100, 120, 3), 150, np.uint8)
    assert detect_fov(bright) == CropBox(0, 0, 100, 120)
    only_text = black.copy()
    only_text[10:14, 10:30] = 255  # too small to be a field of view
    assert detect_fov(only_text) == CropBox(0, 0, 100, 120)


def test_mask_back_mapping_into_full_frame_coordinates(
    make_frame: Callable[..., tuple[np.ndarray, np.ndarray]],
) -> None:
    image, _ = make_frame(200, 300, (20, 110, 180, 270))
    box = detect_fov(image)
    # A lesion square in full-frame coordinates, drawn as the network would see it.
    lesion = np.zeros((200, 300), bool)
    lesion[60:120, 150:210] = True
    crop = torch.from_numpy(box.crop(lesion).astype(np.float32))[None, None]
    network_view = torch.nn.functional.interpolate(crop, size=(65, 65), mode="bilinear", align_corners=False)
    logits = (network_view[0, 0] - 0.5) * 20
    mask = mask_to_source(logits, box, image.shape)
    assert mask.shape == (200, 300) and mask.dtype == bool
    intersection = np.logical_and(mask, lesion).sum()
    union = np.logical_or(mask, lesion).sum()
    assert intersection / union > 0.9
    assert not mask[: box.top].any() and not mask[:, : box.left].any()


def test_mask_threshold_as_logit() -> None:
    assert probability_to_logit(0.5) == pytest.approx(0.0)
    logits = torch.full((8, 8), 1.0)  # sigmoid(1) ~ 0.73
    box = CropBox(0, 0, 8, 8)
    assert mask_to_source(logits, box, (8, 8), threshold=probability_to_logit(0.7)).all()
    assert not mask_to_source(logits, box, (8, 8), threshold=probability_to_logit(0.8)).any()


def _bbox(inside: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def test_preset_is_the_training_and_inference_recipe(make_frame: Callable[..., tuple[np.ndarray, np.ndarray]]) -> None:
    frame, _ = make_frame(200, 300, (20, 110, 180, 270))
    preset = Preset(65)
    box = preset.crop_box(frame)
    assert box == detect_fov(frame)
    by_hand = preset.finish(to_float_tensor(box.crop(frame)))
    at_once, same_box = preset(frame)
    assert same_box == box and torch.equal(by_hand, at_once)
    assert at_once.shape == (3, 65, 65)
    assert torch.equal(prepare(frame, 65)[0], at_once)
    assert Preset(65, fov_crop=False).crop_box(frame) == CropBox(0, 0, 200, 300)
