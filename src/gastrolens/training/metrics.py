"""Evaluation metrics as pure functions of counts, labels and scores (numpy only).

The study scored every class one-vs-rest (accuracy, sensitivity, specificity, PPV, NPV)
and counted per lesion: a lesion is recognised when the network recognises it in at
least one of its images (paper.md, "How it was scored"). Every proportion carries its
n/N counts and a 95% Wilson score interval, so small test sets show how little they
prove. Segmentation is scored by IoU per image (mean over images with a lesion outline)
and pooled over all images (sum of intersections over sum of unions).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal distribution."""


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for ``k`` successes in ``n`` trials; None when ``n`` is 0."""
    if k < 0 or n < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n``, e.g. 27 true positives of 32 positives."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if self.k < 0 or self.n < 0 or self.k > self.n:
            raise ValueError(f"need 0 <= k <= n, got k={self.k}, n={self.n}")

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        return wilson_interval(self.k, self.n)

    def to_dict(self) -> dict[str, object]:
        ci = self.ci95
        return {"value": self.value, "k": self.k, "n": self.n, "ci95": list(ci) if ci else None}

    def format(self, *, ci: bool = True) -> str:
        """``84.4% (27/32) [65.7-93.5]``, or ``n/a (0/0)``."""
        if self.value is None:
            return f"n/a ({self.k}/{self.n})"
        text = f"{100 * self.value:.1f}% ({self.k}/{self.n})"
        interval = self.ci95
        if ci and interval is not None:
            text += f" [{100 * interval[0]:.1f}-{100 * interval[1]:.1f}]"
        return text

    def __str__(self) -> str:
        return self.format()


STAT_NAMES = ("accuracy", "sensitivity", "specificity", "ppv", "npv")
"""The study's five per-class figures, in the order of its Table 2."""


@dataclass(frozen=True)
class BinaryCounts:
    """One-vs-rest counts for one class."""

    tp: int
    fn: int
    tn: int
    fp: int

    def __post_init__(self) -> None:
        for name in ("tp", "fn", "tn", "fp"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def total(self) -> int:
        return self.tp + self.fn + self.tn + self.fp

    @property
    def accuracy(self) -> Proportion:
        return Proportion(self.tp + self.tn, self.total)

    @property
    def sensitivity(self) -> Proportion:
        return Proportion(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Proportion:
        return Proportion(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> Proportion:
        return Proportion(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> Proportion:
        return Proportion(self.tn, self.tn + self.fn)

    def stats(self) -> dict[str, Proportion]:
        return {name: getattr(self, name) for name in STAT_NAMES}

    def to_dict(self) -> dict[str, object]:
        return {
            "counts": {"tp": self.tp, "fn": self.fn, "tn": self.tn, "fp": self.fp},
            **{name: p.to_dict() for name, p in self.stats().items()},
        }


def confusion_matrix(truth: Sequence[int], predicted: Sequence[int], n_classes: int) -> np.ndarray:
    """``matrix[t, p]`` counts images of true class ``t`` predicted as ``p``."""
    t = np.asarray(truth, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"truth and predicted must be 1-D of one length, got {t.shape} and {p.shape}")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= n_classes):
        raise ValueError(f"class indices must lie in 0..{n_classes - 1}")
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (t, p), 1)
    return matrix


def one_vs_rest(matrix: np.ndarray, index: int) -> BinaryCounts:
    """Counts for class ``index`` against all others, from a confusion matrix."""
    tp = int(matrix[index, index])
    fn = int(matrix[index].sum()) - tp
    fp = int(matrix[:, index].sum()) - tp
    tn = int(matrix.sum()) - tp - fn - fp
    return BinaryCounts(tp=tp, fn=fn, tn=tn, fp=fp)


def per_class(matrix: np.ndarray) -> list[BinaryCounts]:
    """One-vs-rest counts for every class of a confusion matrix."""
    return [one_vs_rest(matrix, i) for i in range(matrix.shape[0])]


@dataclass(frozen=True)
class LesionOutcome:
    """Per-lesion truth and the set of classes predicted on any of its images."""

    lesion: Hashable
    truth: int
    predicted: frozenset[int]

    @property
    def recognised(self) -> bool:
        return self.truth in self.predicted


def lesion_outcomes(
    lesions: Sequence[Hashable], truth: Sequence[int], predicted: Sequence[int]
) -> list[LesionOutcome]:
    """Group per-image results by lesion (first-seen order).

    Raises ValueError when one lesion has images of two true classes.
    """
    if not len(lesions) == len(truth) == len(predicted):
        raise ValueError("lesions, truth and predicted must have one length")
    truth_of: dict[Hashable, int] = {}
    seen: dict[Hashable, set[int]] = {}
    for lesion, t, p in zip(lesions, truth, predicted, strict=True):
        if truth_of.setdefault(lesion, int(t)) != int(t):
            raise ValueError(f"lesion {lesion!r} has images of two classes ({truth_of[lesion]} and {t})")
        seen.setdefault(lesion, set()).add(int(p))
    return [LesionOutcome(lesion, truth_of[lesion], frozenset(seen[lesion])) for lesion in truth_of]


def lesion_counts(outcomes: Sequence[LesionOutcome], n_classes: int) -> list[BinaryCounts]:
    """One-vs-rest counts per lesion under the study's rule.

    For class ``c`` a lesion is called positive when any of its images was predicted
    ``c``. So a lesion of class ``c`` is a true positive when recognised in at least one
    image, and a lesion of another class is a false positive for ``c`` when any of its
    images was called ``c``.
    """
    counts = []
    for c in range(n_classes):
        tp = fn = tn = fp = 0
        for outcome in outcomes:
            called = c in outcome.predicted
            if outcome.truth == c:
                tp, fn = (tp + 1, fn) if called else (tp, fn + 1)
            else:
                fp, tn = (fp + 1, tn) if called else (fp, tn + 1)
        counts.append(BinaryCounts(tp=tp, fn=fn, tn=tn, fp=fp))
    return counts


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    n = len(values)
    while start < n:
        stop = start + 1
        while stop < n and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop + 1) / 2.0  # mean of ranks start+1 .. stop
        start = stop
    return ranks


def roc_auc(scores: ArrayLike, positive: ArrayLike) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); ties count one half.

    None when there are no positives or no negatives.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be 1-D of one length")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(scores: ArrayLike, positive: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def mask_overlap(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """``(|A ∩ B|, |A ∪ B|)`` of two boolean masks of one shape."""
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} and {truth.shape}")
    a = predicted.astype(bool, copy=False)
    b = truth.astype(bool, copy=False)
    return int(np.count_nonzero(a & b)), int(np.count_nonzero(a | b))


def iou(predicted: np.ndarray, truth: np.ndarray) -> float | None:
    """IoU of two masks; None when both are empty (nothing to overlap)."""
    intersection, union = mask_overlap(predicted, truth)
    return intersection / union if union else None


@dataclass(frozen=True)
class SegmentationSummary:
    """IoU over a set of images with known masks.

    ``mean_iou`` averages the per-image IoU over images whose true mask is not empty;
    ``pooled_iou`` is sum(intersections) / sum(unions) over all images, so false
    positive pixels on lesion-free images count too. An empty prediction scores 0 on both.
    """

    images: int
    images_with_lesion: int
    mean_iou: float | None
    pooled_iou: float | None
    false_positive_masks: int
    """Images without a true lesion on which a non-empty mask was predicted."""
    per_image: tuple[float, ...]
    """IoU of every image with a true lesion, in input order (for the histogram)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "images": self.images,
            "images_with_lesion": self.images_with_lesion,
            "mean_iou": self.mean_iou,
            "pooled_iou": self.pooled_iou,
            "false_positive_masks": self.false_positive_masks,
        }


def summarise_segmentation(
    intersections: Sequence[int], unions: Sequence[int], truth_areas: Sequence[int]
) -> SegmentationSummary:
    """Summarise per-image overlaps from :func:`mask_overlap` and the true masks' areas."""
    inter = np.asarray(intersections, dtype=np.int64)
    union = np.asarray(unions, dtype=np.int64)
    area = np.asarray(truth_areas, dtype=np.int64)
    if not inter.shape == union.shape == area.shape:
        raise ValueError("intersections, unions and truth_areas must have one length")
    lesion = area > 0
    per_image = tuple(float(i / u) for i, u in zip(inter[lesion], union[lesion], strict=True))
    total_union = int(union.sum())
    return SegmentationSummary(
        images=int(inter.size),
        images_with_lesion=int(lesion.sum()),
        mean_iou=float(np.mean(per_image)) if per_image else None,
        pooled_iou=float(inter.sum()) / total_union if total_union else None,
        false_positive_masks=int(np.count_nonzero(~lesion & (union > 0))),
        per_image=per_image,
    )


def counts_table(counts: Mapping[str, BinaryCounts]) -> dict[str, dict[str, object]]:
    """``{class: BinaryCounts.to_dict()}`` for JSON reports."""
    return {name: c.to_dict() for name, c in counts.items()}
