"""Training inputs: the inference pre-processing exactly, then the study's joint augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gastrolens.findings import LesionClass
from gastrolens.models.package import PreprocessingCard
from gastrolens.models.preprocess import prepare
from gastrolens.samples import endoscopy_frame
from gastrolens.training.augment import (
    AugmentationSettings,
    PairTransform,
    classifier_augmentation,
    segmenter_augmentation,
)

CARD = PreprocessingCard()
GEOMETRY_ONLY = AugmentationSettings(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, elastic_probability=1.0)


@pytest.mark.parametrize("size", [64, 65])
def test_without_augmentation_training_sees_what_inference_sees(size: int) -> None:
    frame, mask = endoscopy_frame(120, 150, LesionClass.AGC, seed=5)
    image, target = PairTransform(size, CARD)(frame, mask)
    expected, box = prepare(frame, size, fov_crop=True)
    assert torch.equal(image, expected)
    assert target is not None and target.shape == (size, size) and target.dtype == torch.bool
    # the mask went through the same crop: its share of the crop is about the same
    assert target.float().mean().item() == pytest.approx(box.crop(mask).mean(), abs=0.02)


def _square(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A white square on mid grey; its mask is exactly the square (FOV crop off)."""
    rgb = np.full((size, size, 3), 128, np.uint8)
    mask = np.zeros((size, size), bool)
    mask[20:44, 24:40] = True
    rgb[mask] = 255
    return rgb, mask


@pytest.mark.parametrize("build", [classifier_augmentation, segmenter_augmentation])
def test_geometry_moves_image_and_mask_together(build) -> None:
    size = 64
    rgb, mask = _square(size)
    transform = PairTransform(size, CARD.model_copy(update={"fov_crop": False}), build(size, GEOMETRY_ONLY))
    torch.manual_seed(0)
    mean = torch.tensor(CARD.normalisation.mean).reshape(3, 1, 1)
    std = torch.tensor(CARD.normalisation.std).reshape(3, 1, 1)
    moved = 0
    for _ in range(6):
        image, target = transform(rgb, mask)
        assert image.shape == (3, size, size) and target is not None and target.shape == (size, size)
        bright = (image * std + mean)[0] > 0.75  # the white square, wherever it went
        overlap = (bright & target).sum().item() / max((bright | target).sum().item(), 1)
        assert overlap > 0.8
        moved += not torch.equal(target, torch.from_numpy(mask))
    assert moved >= 5  # the augmentation did move things


def test_colour_jitter_leaves_the_mask_alone() -> None:
    size = 64
    rgb, mask = _square(size)
    colour_only = AugmentationSettings(
        affine_degrees=0, affine_translate=0, affine_scale=(1, 1), affine_shear=0, elastic_probability=0,
        hflip_probability=0, crop_scale=(1, 1), brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1,
    )
    transform = PairTransform(size, CARD.model_copy(update={"fov_crop": False}),
                              classifier_augmentation(size, colour_only))
    torch.manual_seed(1)
    plain, _ = PairTransform(size, CARD.model_copy(update={"fov_crop": False}))(rgb, mask)
    image, target = transform(rgb, mask)
    assert torch.equal(target, torch.from_numpy(mask))
    assert not torch.allclose(image, plain)


def test_segmenter_crop_keeps_the_input_size_at_every_scale() -> None:
    frame, mask = endoscopy_frame(90, 100, LesionClass.SMT, seed=2)
    transform = PairTransform(65, CARD, segmenter_augmentation(65))
    torch.manual_seed(3)
    for _ in range(5):
        image, target = transform(frame, mask)
        assert image.shape == (3, 65, 65) and target.shape == (65, 65)
        assert torch.isfinite(image).all()
