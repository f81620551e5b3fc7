"""Model packages: a folder the daemon loads, with weights it can prove it loaded.

Layout::

    PACKAGE/
      model.json            the model card (ModelCard, JSON)
      weights.safetensors   both networks' tensors; keys "classifier.<name>", "segmenter.<name>"

The package's ``weights_sha256`` is the sha256 of the bytes of ``weights.safetensors``
(the file as written, header included). Every output names it, and output UIDs derive
from it, so the same bytes always give the same UIDs. Loading reads the file once,
hashes those bytes, and parses the same bytes: what is hashed is what runs.

Each network has its own card section with ``trained``: a package may pair a trained
classifier with an untrained segmenter (or the reverse). A package with any untrained
network is reported as untrained (``ModelIdentity.untrained``) and every output made
with it carries the UNTRAINED warning; ``untrained_networks`` says which.

Only safetensors is read here; no pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from gastrolens.errors import ModelPackageError
from gastrolens.findings import CLASS_ORDER, ModelIdentity
from gastrolens.models import networks
from gastrolens.models.decision import DecisionRule
from gastrolens.models.preprocess import (
    CLASSIFIER_INPUT_SIZE,
    FOV_THRESHOLD,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    SEGMENTER_INPUT_SIZE,
    STUDY_MEAN,
    STUDY_STD,
    Normalisation,
    Preset,
)

logger = logging.getLogger(__name__)

CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
CARD_FORMAT: Final = "gastrolens-model-card"
CARD_FORMAT_VERSION = 1
UNTRAINED_NAME = "gastrolens-untrained"
_NETWORKS = ("classifier", "segmenter")


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NormalisationCard(_Card):
    mean: tuple[float, float, float] = STUDY_MEAN
    std: tuple[float, float, float] = STUDY_STD

    @field_validator("std")
    @classmethod
    def _positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every std must be positive")
        return value

    def to_normalisation(self) -> Normalisation:
        return Normalisation(self.mean, self.std)


class PreprocessingCard(_Card):
    normalisation: NormalisationCard = NormalisationCard()
    fov_crop: bool = True
    """Crop to the field of view before resizing (the engine may switch it off)."""
    fov_threshold: int = Field(FOV_THRESHOLD, ge=0, le=254)


class ClassifierCard(_Card):
    architecture: str = networks.CLASSIFIER_ARCHITECTURE
    input_size: int = Field(CLASSIFIER_INPUT_SIZE, ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE)
    trained: bool = False
    initialisation: str = "random"
    """How the weights started: "random", "imagenet", ... (free text, for people)."""


class SegmenterCard(_Card):
    architecture: str = networks.SEGMENTER_ARCHITECTURE
    input_size: int = Field(SEGMENTER_INPUT_SIZE, ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE)
    output_stride: int = 16
    trained: bool = False
    initialisation: str = "random"


class ModelCard(_Card):
    """What a package is, how to feed it and how far to trust it. Stored as ``model.json``."""

    format: Literal["gastrolens-model-card"] = CARD_FORMAT
    format_version: int = CARD_FORMAT_VERSION
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    """Both fit a DICOM LO element: outputs write them as they are."""
    description: str = ""
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    classes: tuple[str, ...] = tuple(c.value for c in CLASS_ORDER)
    preprocessing: PreprocessingCard = PreprocessingCard()
    classifier: ClassifierCard = ClassifierCard()
    segmenter: SegmenterCard = SegmenterCard()
    decision: DecisionRule = DecisionRule()
    training: dict[str, Any] = Field(default_factory=dict)
    """Summary of how the networks were trained (data, recipe, epochs...)."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    """Evaluation results, e.g. per-class sensitivity and segmentation IoU."""
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    """sha256 of the weights file's bytes; empty only before the package is first written."""

    @property
    def untrained_networks(self) -> tuple[str, ...]:
        return tuple(name for name in _NETWORKS if not getattr(self, name).trained)

    def preset(self, network: Literal["classifier", "segmenter"], *, fov_crop: bool | None = None) -> Preset:
        """The input recipe of one network, as training and inference must both apply it."""
        pre = self.preprocessing
        return Preset(
            size=getattr(self, network).input_size,
            normalisation=pre.normalisation.to_normalisation(),
            fov_crop=pre.fov_crop if fov_crop is None else fov_crop,
            fov_threshold=pre.fov_threshold,
        )

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


@dataclass
class ModelPackage:
    """A card and the two networks it describes, on the CPU as loaded or built."""

    card: ModelCard
    classifier: nn.Module
    segmenter: nn.Module
    path: Path | None = field(default=None)

    @property
    def untrained(self) -> bool:
        """True when any network was never trained: outputs then carry the UNTRAINED warning."""
        return bool(self.card.untrained_networks)

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.card.name, self.card.version, self.card.weights_sha256, self.untrained)


def weights_bytes(classifier: nn.Module, segmenter: nn.Module) -> bytes:
    """The exact bytes of ``weights.safetensors`` for these networks (deterministic)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("classifier", classifier), ("segmenter", segmenter)):
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to("cpu").contiguous()
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def build_package(card: ModelCard, classifier: nn.Module, segmenter: nn.Module) -> ModelPackage:
    """Wrap networks in memory (e.g. after training) as a package whose card carries their hash.

    The card's ``segmenter.output_stride`` is set from the segmenter. The hash is a
    snapshot: build again after changing the weights (:func:`save_package` always
    re-hashes what it writes).
    """
    segmenter_card = card.segmenter.model_copy(update={"output_stride": networks.output_stride_of(segmenter)})
    digest = hashlib.sha256(weights_bytes(classifier, segmenter)).hexdigest()
    return ModelPackage(
        card.model_copy(update={"segmenter": segmenter_card, "weights_sha256": digest}), classifier, segmenter
    )


def untrained_package(
    *,
    classifier_input_size: int = CLASSIFIER_INPUT_SIZE,
    segmenter_input_size: int = SEGMENTER_INPUT_SIZE,
    output_stride: int = 16,
    seed: int = 0,
) -> ModelPackage:
    """Deterministic randomly initialised networks, named ``gastrolens-untrained``.

    The weights depend only on ``seed`` and the torch version (its initialisers), so the
    weights sha256 is the same on every machine running the same versions. The global
    random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = networks.build_classifier()
        torch.manual_seed(seed + 1)
        segmenter = networks.build_segmenter(output_stride)
    torch_version = torch.__version__.split("+")[0]
    card = ModelCard(
        name=UNTRAINED_NAME,
        version=f"torch-{torch_version}-seed-{seed}",
        description="Randomly initialised weights. NOT FOR DIAGNOSTIC USE.",
        classifier=ClassifierCard(input_size=classifier_input_size, initialisation=f"random(seed={seed})"),
        segmenter=SegmenterCard(
            input_size=segmenter_input_size, output_stride=output_stride, initialisation=f"random(seed={seed + 1})"
        ),
    )
    return build_package(card, classifier, segmenter)


def save_package(package: ModelPackage, path: str | Path) -> ModelCard:
    """Write ``package`` to the folder ``path`` (created; existing files replaced atomically).

    The weights are serialised again and the card gets their hash, so the written card
    always matches the written weights. Returns that card.
    """
    folder = Path(path)
    data = weights_bytes(package.classifier, package.segmenter)
    card = package.card.model_copy(
        update={
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "weights_file": WEIGHTS_FILE,
            "segmenter": package.card.segmenter.model_copy(
                update={"output_stride": networks.output_stride_of(package.segmenter)}
            ),
        }
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / WEIGHTS_FILE, data)
        _write_atomic(folder / CARD_FILE, card.to_json().encode("utf-8"))
    except OSError as exc:
        raise ModelPackageError(f"cannot write model package {folder}: {exc}") from exc
    package.card = card
    package.path = folder
    logger.info("wrote model package %s %s (weights sha256 %s)", card.name, card.version, card.weights_sha256)
    return card


def read_card(path: str | Path) -> ModelCard:
    """Read and validate ``model.json`` of a package (weights not touched)."""
    folder = Path(path)
    if not folder.exists():
        raise ModelPackageError(f"model package {folder} does not exist")
    if not folder.is_dir():
        raise ModelPackageError(f"model package {folder} is not a folder")
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise ModelPackageError(f"model package {folder} is missing {CARD_FILE}")
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"{card_path}: not a readable JSON file ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != CARD_FORMAT:
        raise ModelPackageError(f"{card_path}: not a GastroLens model card (format is not {CARD_FORMAT!r})")
    if raw.get("format_version") != CARD_FORMAT_VERSION:
        raise ModelPackageError(
            f"{card_path}: card format_version {raw.get('format_version')!r}; "
            f"this GastroLens reads {CARD_FORMAT_VERSION}"
        )
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelPackageError(f"{card_path}: {_describe(exc)}") from exc
    _check_card(card, card_path)
    return card


def load_package(path: str | Path) -> ModelPackage:
    """Load and verify a package: card, class list, architectures, sha256, tensors.

    Raises :class:`ModelPackageError` naming what is missing or differs.
    """
    folder = Path(path)
    card = read_card(folder)
    weights_path = folder / card.weights_file
    if not weights_path.is_file():
        raise ModelPackageError(f"model package {folder} is missing {card.weights_file}")
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise ModelPackageError(f"{weights_path}: cannot read ({exc.strerror})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.weights_sha256:
        raise ModelPackageError(
            f"{weights_path}: sha256 is {digest} but the card says {card.weights_sha256}: "
            "the weights were changed after the package was written"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise ModelPackageError(f"{weights_path}: not a safetensors file ({exc})") from exc
    with torch.device("meta"):  # shapes only: every tensor comes from the file
        classifier = networks.build_classifier(len(card.classes))
        segmenter = networks.build_segmenter(card.segmenter.output_stride)
    for name, module in (("classifier", classifier), ("segmenter", segmenter)):
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        load_state(module, state, f"{weights_path}: {name}")
    strays = sorted(k for k in tensors if not k.startswith(("classifier.", "segmenter.")))
    if strays:
        raise ModelPackageError(f"{weights_path}: tensors of no network: {strays[:5]}")
    logger.info("loaded model package %s %s from %s (weights sha256 %s)", card.name, card.version, folder, digest)
    return ModelPackage(card, classifier, segmenter, folder)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``module`` strictly, after checking names, shapes and finiteness.

    The module's own tensors are replaced (``assign``), so it may be built on the meta device.
    """
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ModelPackageError(
            f"{what}: weights do not fit the architecture: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    wrong = sorted(k for k in own if tuple(own[k].shape) != tuple(state[k].shape))
    if wrong:
        key = wrong[0]
        raise ModelPackageError(
            f"{what}: tensor {key} has shape {tuple(state[key].shape)}, the architecture needs "
            f"{tuple(own[key].shape)} ({len(wrong)} tensors differ)"
        )
    check_finite(state, what)
    module.load_state_dict(state, strict=True, assign=True)


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity: they would make every output meaningless."""
    for key, value in state.items():
        # A sum is finite only if every element is (fast); confirm exactly before refusing.
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value.sum(dtype=torch.float64))):  # noqa: SIM102 - the exact check only after the cheap one
            if not bool(torch.isfinite(value).all()):
                raise ModelPackageError(f"{what}: tensor {key} holds NaN or infinite values")


def _check_card(card: ModelCard, where: Path) -> None:
    expected = tuple(c.value for c in CLASS_ORDER)
    if card.classes != expected:
        raise ModelPackageError(f"{where}: classes {list(card.classes)} differ from GastroLens's {list(expected)}")
    if card.classifier.architecture != networks.CLASSIFIER_ARCHITECTURE:
        raise ModelPackageError(
            f"{where}: classifier architecture {card.classifier.architecture!r} differs from "
            f"{networks.CLASSIFIER_ARCHITECTURE!r}, the only one GastroLens builds"
        )
    if card.segmenter.architecture != networks.SEGMENTER_ARCHITECTURE:
        raise ModelPackageError(
            f"{where}: segmenter architecture {card.segmenter.architecture!r} differs from "
            f"{networks.SEGMENTER_ARCHITECTURE!r}, the only one GastroLens builds"
        )
    if card.segmenter.output_stride not in networks.OUTPUT_STRIDES:
        raise ModelPackageError(
            f"{where}: segmenter output_stride {card.segmenter.output_stride} is not one of {networks.OUTPUT_STRIDES}"
        )
    if not card.weights_sha256:
        raise ModelPackageError(f"{where}: weights_sha256 is empty")
    if Path(card.weights_file).name != card.weights_file or card.weights_file in ("", ".", ".."):
        raise ModelPackageError(f"{where}: weights_file {card.weights_file!r} must be a file name inside the package")


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}" for e in exc.errors())


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
