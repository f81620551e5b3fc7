"""The training recipe: the study's choices where it states them, ours where it does not.

From the study (paper.md): SGD, initial learning rate 1e-4, batch size 32, ImageNet
initialisation of the ResNet-34, input 512 (classification) and 513 (segmentation),
the augmentations of :mod:`gastrolens.training.augment`.

Our choices (the study does not give them): momentum 0.9, weight decay 1e-4, a cosine
learning-rate schedule over the run, 30 epochs, cross-entropy for the classifier, BCE +
soft Dice for the segmenter (a lesion covers a few percent of a frame, and Dice keeps
the segmenter from settling on "no lesion"), a 20% patient-level validation split,
segmenter output stride 16, and "precise BatchNorm": before every validation the
BatchNorm statistics are re-estimated on up to ``precise_bn_batches`` training batches
with the final weights, so that evaluation-mode statistics match the weights (short or
fast-moving runs otherwise validate with stale statistics).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from gastrolens.models.preprocess import CLASSIFIER_INPUT_SIZE, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, SEGMENTER_INPUT_SIZE
from gastrolens.training.augment import AugmentationSettings

Task = Literal["classifier", "segmenter"]
TASKS: tuple[Task, ...] = ("classifier", "segmenter")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run's result. Checkpoints store it."""

    task: Task
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    step_epochs: int = 10
    """``step`` schedule: multiply the learning rate by ``step_gamma`` every this many epochs."""
    step_gamma: float = 0.1
    image_size: int = 0
    """0: the study's size for the task (512 or 513)."""
    output_stride: int = 16
    val_fraction: float = 0.2
    seed: int = 0
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling); CPU runs fp32."""
    precise_bn_batches: int = 50
    augment: bool = True
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)
    imagenet: str | None = None
    """Local path of torchvision's resnet34 ImageNet state dict, or None for random initialisation."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 2,  # BatchNorm needs two samples per batch
            "learning_rate": self.learning_rate > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "step_epochs": self.step_epochs >= 1,
            "step_gamma": 0 < self.step_gamma <= 1,
            "image_size": self.image_size == 0 or MIN_IMAGE_SIDE <= self.image_size <= MAX_IMAGE_SIDE,
            "val_fraction": 0 <= self.val_fraction < 1,
            "precise_bn_batches": self.precise_bn_batches >= 0,
            "output_stride": self.output_stride in (8, 16),
            "schedule": self.schedule in SCHEDULES,
            "optimizer": self.optimizer in OPTIMIZERS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            name = bad[0]
            raise ValueError(f"recipe {name} = {getattr(self, name)!r} is not allowed")
        if self.imagenet is not None and not Path(self.imagenet).is_file():
            raise ValueError(f"recipe imagenet: file {self.imagenet} does not exist")

    @property
    def input_size(self) -> int:
        if self.image_size:
            return self.image_size
        return CLASSIFIER_INPUT_SIZE if self.task == "classifier" else SEGMENTER_INPUT_SIZE

    def with_changes(self, **changes: object) -> Recipe:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly, with the resolved input size and where each choice comes from."""
        data = asdict(self)
        data["input_size"] = self.input_size
        data["sources"] = {
            "study": ["optimizer=sgd", "learning_rate=1e-4", "batch_size=32", "augmentations", "input sizes"],
            "gastrolens": ["momentum", "weight_decay", "schedule", "epochs", "loss", "val_fraction", "precise_bn"],
        }
        return data

    def fingerprint(self) -> dict[str, object]:
        """What must not change when a run is resumed (everything but ``epochs``)."""
        data = asdict(self)
        data.pop("epochs")
        data.pop("imagenet")  # only the first epoch reads it
        return data
