"""Put a trained network into a model package, keeping the other network already there.

A package always holds both networks. Training one of them reads the package in the
output folder (when there is one), replaces that network and its card section, and
keeps the other network, its card section, its training record and its metrics. A
folder without a package starts from :func:`untrained_package`; the network not trained
then stays marked ``trained: false`` and everything made with it says UNTRAINED.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from gastrolens import __version__
from gastrolens.errors import ModelPackageError
from gastrolens.models.package import (
    CARD_FILE,
    UNTRAINED_NAME,
    ModelPackage,
    build_package,
    load_package,
    save_package,
    untrained_package,
)
from gastrolens.models.preprocess import CLASSIFIER_INPUT_SIZE, MIN_IMAGE_SIDE, SEGMENTER_INPUT_SIZE
from gastrolens.training.recipe import Recipe, Task

logger = logging.getLogger(__name__)

DEFAULT_NAME = "gastrolens-site"


def base_package(out_dir: Path, recipe: Recipe) -> ModelPackage:
    """The package in ``out_dir``, or a fresh untrained one sized for ``recipe``.

    A fresh package gives the other network the study's input size, or, when the run
    uses ``image_size``, that size (+1 for the segmenter, as the study's 512 / 513).
    """
    if (out_dir / CARD_FILE).exists():
        package = load_package(out_dir)
        logger.info(
            "updating the %s of package %s %s in %s (keeping the other network)",
            recipe.task,
            package.card.name,
            package.card.version,
            out_dir,
        )
        return package
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelPackageError(f"output {out_dir} exists and is not a folder")
    size = recipe.image_size
    if size:
        classifier_size = size if recipe.task == "classifier" else max(MIN_IMAGE_SIDE, size - 1)
        segmenter_size = size if recipe.task == "segmenter" else size + 1
    else:
        classifier_size, segmenter_size = CLASSIFIER_INPUT_SIZE, SEGMENTER_INPUT_SIZE
    logger.info("no package in %s yet: starting from untrained networks", out_dir)
    return untrained_package(
        classifier_input_size=classifier_size,
        segmenter_input_size=segmenter_size,
        output_stride=recipe.output_stride,
        seed=recipe.seed,
    )


def with_trained_network(
    base: ModelPackage,
    task: Task,
    network: nn.Module,
    recipe: Recipe,
    *,
    initialisation: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
    name: str | None = None,
    version: str | None = None,
) -> ModelPackage:
    """A new package: ``base`` with ``task``'s network, card section, record and metrics replaced."""
    card = base.card
    section = getattr(card, task).model_copy(
        update={"input_size": recipe.input_size, "trained": True, "initialisation": initialisation}
    )
    if name is None:
        name = card.name if card.name != UNTRAINED_NAME else DEFAULT_NAME
    if version is None:
        version = datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    classifier = network if task == "classifier" else base.classifier
    segmenter = network if task == "segmenter" else base.segmenter
    updated = card.model_copy(
        update={
            task: section,
            "name": name,
            "version": version,
            "created": datetime.now(UTC),
            "training": {**card.training, task: training},
            "metrics": {**card.metrics, task: metrics},
        }
    )
    untrained = updated.untrained_networks
    description = f"Trained locally with gastrolens {__version__} ('gastrolens train')."
    if untrained:
        description += f" UNTRAINED: {', '.join(untrained)} (random weights) - NOT FOR DIAGNOSTIC USE."
    return build_package(updated.model_copy(update={"description": description}), classifier, segmenter)


def write(package: ModelPackage, out_dir: Path) -> ModelPackage:
    """Save ``package`` into ``out_dir`` (weights re-hashed) and return it."""
    save_package(package, out_dir)
    untrained = package.card.untrained_networks
    if untrained:
        logger.warning("package %s: %s still UNTRAINED; its outputs will say so", out_dir, ", ".join(untrained))
    return package
