"""The decision rule: class probabilities and a lesion mask -> one finding.

The rule lives in the model card (``decision``) so that whoever validated a package
also fixed its operating point. In order:

1. ``p_lesion = 1 - p(normal)``. The classifier calls a lesion when
   ``p_lesion >= lesion_threshold``.
2. A pixel is lesion when the segmenter's sigmoid output is ``>= mask_threshold``.
   A mask covering less than ``min_area_fraction`` of the source frame is noise and is
   cleared.
3. ``lesion_present`` combines both according to ``combine``:
   ``classifier`` (default: the classifier decides, as scored in the study),
   ``both`` (classifier and a non-empty mask), ``either`` (classifier or mask).
4. ``predicted`` is the most probable of the four lesion classes when a lesion is
   present, else ``normal``; so the class written on an output never contradicts
   ``lesion_present``.
5. With ``mask_only_when_present`` (default) the mask is cleared when no lesion is
   present, so no SEG outlines a lesion on a frame reported as normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gastrolens.findings import CLASS_ORDER, LesionClass


class DecisionRule(BaseModel):
    """Operating point of a model package; see the module docstring for the rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lesion_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Lesion when 1 - p(normal) is at least this."""
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """A pixel is lesion when its sigmoid output is at least this."""
    min_area_fraction: float = Field(0.0005, ge=0.0, le=1.0)
    """Masks smaller than this part of the source frame are cleared."""
    combine: Literal["classifier", "both", "either"] = "classifier"
    mask_only_when_present: bool = True


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`decide` for one frame."""

    predicted: LesionClass
    lesion_present: bool
    mask: np.ndarray
    lesion_area_fraction: float
    bbox: tuple[int, int, int, int] | None


def decide(
    probabilities: Sequence[float],
    mask: np.ndarray,
    rule: DecisionRule,
    *,
    measured: tuple[int, tuple[int, int, int, int] | None] | None = None,
) -> Decision:
    """Apply ``rule`` to one frame's class probabilities and full-resolution boolean mask.

    ``measured`` is the mask's pixel count and bounding box when already known (the
    engine measures masks on its device); otherwise they are computed here.
    """
    if len(probabilities) != len(CLASS_ORDER):
        raise ValueError(f"expected {len(CLASS_ORDER)} probabilities, got {len(probabilities)}")
    if measured is None:
        pixels = int(np.count_nonzero(mask))
        box = bounding_box(mask) if pixels else None
    else:
        pixels, box = measured
    p_lesion = 1.0 - float(probabilities[CLASS_ORDER.index(LesionClass.NORMAL)])
    classifier_says = p_lesion >= rule.lesion_threshold
    if (pixels / mask.size if mask.size else 0.0) < rule.min_area_fraction:
        mask, pixels, box = np.zeros_like(mask), 0, None
    mask_says = pixels > 0
    if rule.combine == "classifier":
        present = classifier_says
    elif rule.combine == "both":
        present = classifier_says and mask_says
    else:
        present = classifier_says or mask_says
    if rule.mask_only_when_present and not present and mask_says:
        mask, pixels, box = np.zeros_like(mask), 0, None
    predicted = _most_probable_lesion(probabilities) if present else LesionClass.NORMAL
    return Decision(predicted, present, mask, pixels / mask.size if mask.size else 0.0, box)


def _most_probable_lesion(probabilities: Sequence[float]) -> LesionClass:
    lesions = [(float(p), cls) for p, cls in zip(probabilities, CLASS_ORDER, strict=True) if cls.is_lesion]
    return max(lesions, key=lambda item: item[0])[1]


def area_fraction(mask: np.ndarray) -> float:
    """Lesion pixels over all pixels of the source frame."""
    return float(np.count_nonzero(mask)) / float(mask.size) if mask.size else 0.0


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row_min, col_min, row_max, col_max)`` with exclusive maxima, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
