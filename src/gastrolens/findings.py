"""What the networks found, in terms both `models` and `dicom_io` understand.

This module is the meeting point between inference and DICOM writing: `models`
produces :class:`ImageFinding` objects and `dicom_io` turns them into SEG, SR and
overlay images. It depends on numpy only, so `dicom_io` never imports torch and
`models` never imports DICOM.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class LesionClass(str, enum.Enum):
    """The study's five image classes, in the fixed order of the classifier's outputs."""

    NORMAL = "normal"
    PU = "pu"
    EGC_HGIN = "egc_hgin"
    AGC = "agc"
    SMT = "smt"

    @property
    def display_name(self) -> str:
        """Human-readable name, as written on overlays and in reports."""
        return _DISPLAY_NAMES[self]

    @property
    def is_lesion(self) -> bool:
        return self is not LesionClass.NORMAL


_DISPLAY_NAMES = {
    LesionClass.NORMAL: "normal gastric mucosa",
    LesionClass.PU: "peptic ulcer",
    LesionClass.EGC_HGIN: "early gastric cancer / HGIN",
    LesionClass.AGC: "advanced gastric cancer",
    LesionClass.SMT: "submucosal tumour",
}

CLASS_ORDER: tuple[LesionClass, ...] = tuple(LesionClass)
"""Index i of the classifier's output is ``CLASS_ORDER[i]``."""


class OutputKind(str, enum.Enum):
    """The result objects GastroLens writes back into a study."""

    SEG = "seg"
    SR = "sr"
    OVERLAY = "overlay"
    STUDY_SR = "study_sr"


@dataclass(frozen=True)
class ModelIdentity:
    """Names the model behind a finding; every output carries it."""

    name: str
    version: str
    weights_sha256: str
    untrained: bool
    """True when any network behind the finding was never trained."""


@dataclass(frozen=True)
class ImageFinding:
    """The engine's result for one RGB frame.

    ``mask`` is a boolean array at the source frame's resolution (rows, cols).
    ``bbox`` is ``(row_min, col_min, row_max, col_max)`` with exclusive maxima, or
    ``None`` when the mask is empty. ``probabilities`` follow :data:`CLASS_ORDER`.
    """

    probabilities: tuple[float, ...]
    predicted: LesionClass
    lesion_present: bool
    mask: np.ndarray
    lesion_area_fraction: float
    bbox: tuple[int, int, int, int] | None
    model: ModelIdentity
    timings: dict[str, float] = field(default_factory=dict)

    def probability(self, cls: LesionClass) -> float:
        return self.probabilities[CLASS_ORDER.index(cls)]
