"""The study's augmentations (torchvision.transforms.v2), applied jointly to image and mask.

Every sample goes through three stages:

1. the inference pre-processing of :mod:`gastrolens.models.preprocess`, unchanged:
   field-of-view crop (``detect_fov`` with the card's threshold, or the full frame),
   uint8 -> float in [0, 1], antialiased resize to the network's input size. The mask
   gets the same crop and resize (area-weighted, then >= 0.5);
2. training only: the study's random transforms on ``tv_tensors.Image`` and
   ``tv_tensors.Mask`` together, so geometry moves both and colour touches only the image
   (v2 resamples masks with nearest neighbour);
3. the study's per-channel z-score (the card's normalisation).

Without augmentation (validation) a sample is therefore exactly what the engine feeds
the network. Augmenting after the resize keeps the elastic deformation affordable at
512 px; the random crops are then resized back to the input size.

The study names the operations and the crop / scale ranges (paper.md); it gives no
magnitudes, so those in :class:`AugmentationSettings` are our choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from gastrolens.models.package import PreprocessingCard
from gastrolens.models.preprocess import detect_fov, full_frame, normalise, resize, to_float_tensor

REFERENCE_SIZE = 512
"""Pixel magnitudes below (translation is relative) are given for this input size and scaled."""


@dataclass(frozen=True)
class AugmentationSettings:
    """Magnitudes of the study's augmentations (our choices, see the module docstring)."""

    affine_degrees: float = 15.0
    affine_translate: float = 0.05
    affine_scale: tuple[float, float] = (0.9, 1.1)
    affine_shear: float = 5.0
    elastic_probability: float = 0.5
    elastic_alpha: float = 50.0
    """Displacement magnitude in pixels at 512 px (torchvision's default)."""
    elastic_sigma: float = 5.0
    """Smoothness of the displacement field in pixels at 512 px (torchvision's default)."""
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    hflip_probability: float = 0.5
    crop_scale: tuple[float, float] = (0.8, 1.0)
    """Classification: random resized crop area range (the study's 0.8-1)."""
    segmentation_scale: tuple[float, float] = (0.8, 1.2)
    """Segmentation: random rescale range before the random crop (the study's 0.8-1.2)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _geometry(settings: AugmentationSettings, size: int) -> list[v2.Transform]:
    factor = size / REFERENCE_SIZE
    return [
        v2.RandomAffine(
            degrees=settings.affine_degrees,
            translate=(settings.affine_translate, settings.affine_translate),
            scale=settings.affine_scale,
            shear=settings.affine_shear,
            interpolation=v2.InterpolationMode.BILINEAR,
        ),
        v2.RandomApply(
            [
                v2.ElasticTransform(
                    alpha=settings.elastic_alpha * factor, sigma=max(settings.elastic_sigma * factor, 0.5)
                )
            ],
            p=settings.elastic_probability,
        ),
    ]


def classifier_augmentation(size: int, settings: AugmentationSettings = AugmentationSettings()) -> v2.Transform:
    """Random affine, elastic, colour jitter (b, c, s, h), flip, random resized crop 0.8-1."""
    return v2.Compose(
        [
            *_geometry(settings, size),
            v2.ColorJitter(settings.brightness, settings.contrast, settings.saturation, settings.hue),
            v2.RandomHorizontalFlip(settings.hflip_probability),
            v2.RandomResizedCrop(size, scale=settings.crop_scale, antialias=True),
        ]
    )


def segmenter_augmentation(size: int, settings: AugmentationSettings = AugmentationSettings()) -> v2.Transform:
    """Random affine, elastic, brightness jitter, flip, random scale 0.8-1.2, random crop."""
    low, high = settings.segmentation_scale
    return v2.Compose(
        [
            *_geometry(settings, size),
            v2.ColorJitter(brightness=settings.brightness),
            v2.RandomHorizontalFlip(settings.hflip_probability),
            v2.RandomResize(max(1, round(low * size)), round(high * size) + 1, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True),
        ]
    )


class PairTransform:
    """``(rgb uint8, mask or None) -> (network input (3, S, S), bool mask (S, S) or None)``.

    Picklable, so DataLoader workers can run it.
    """

    def __init__(
        self, size: int, preprocessing: PreprocessingCard, augmentation: v2.Transform | None = None
    ) -> None:
        self.size = size
        self.preprocessing = preprocessing
        self.normalisation = preprocessing.normalisation.to_normalisation()
        self.augmentation = augmentation

    def __call__(self, rgb: np.ndarray, mask: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        card = self.preprocessing
        box = detect_fov(rgb, threshold=card.fov_threshold) if card.fov_crop else full_frame(rgb)
        image = resize(to_float_tensor(box.crop(rgb)), self.size)
        target = None
        if mask is not None:
            cropped = torch.from_numpy(np.ascontiguousarray(box.crop(mask))).to(torch.float32)
            target = resize(cropped[None], self.size)[0] >= 0.5
        if self.augmentation is not None:
            if target is None:
                image = self.augmentation(tv_tensors.Image(image)).as_subclass(torch.Tensor)
            else:
                out_image, out_mask = self.augmentation(
                    tv_tensors.Image(image), tv_tensors.Mask(target[None].to(torch.uint8))
                )
                image = out_image.as_subclass(torch.Tensor)
                target = out_mask.as_subclass(torch.Tensor)[0] > 0
            image = image.clamp_(0.0, 1.0)
        return normalise(image, self.normalisation), target
