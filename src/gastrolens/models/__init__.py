"""The study's networks and everything needed to run them reproducibly.

``preprocess`` (the preset shared with training), ``networks`` (ResNet-34 classifier,
DeepLabv3-ResNet-34 segmenter), ``package`` (safetensors weights + JSON model card +
sha256), ``decision`` (probabilities and mask -> finding), ``engine`` (batched
inference). Nothing here knows about DICOM.
"""

from __future__ import annotations

from gastrolens.models.decision import DecisionRule, decide
from gastrolens.models.engine import Engine, resolve_device
from gastrolens.models.networks import build_classifier, build_segmenter, load_imagenet_backbone, set_output_stride
from gastrolens.models.package import (
    ModelCard,
    ModelPackage,
    build_package,
    load_package,
    read_card,
    save_package,
    untrained_package,
)
from gastrolens.models.preprocess import (
    STUDY_MEAN,
    STUDY_NORMALISATION,
    STUDY_STD,
    CropBox,
    Normalisation,
    detect_fov,
    mask_to_source,
    prepare,
    validate_image,
)

__all__ = [
    "STUDY_MEAN",
    "STUDY_NORMALISATION",
    "STUDY_STD",
    "CropBox",
    "DecisionRule",
    "Engine",
    "ModelCard",
    "ModelPackage",
    "Normalisation",
    "build_classifier",
    "build_package",
    "build_segmenter",
    "decide",
    "detect_fov",
    "load_imagenet_backbone",
    "load_package",
    "mask_to_source",
    "prepare",
    "read_card",
    "resolve_device",
    "save_package",
    "set_output_stride",
    "untrained_package",
    "validate_image",
]
