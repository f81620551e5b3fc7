"""The study-level conclusion: the paper's per-lesion rule, as pure logic (no DICOM).

The study scored a lesion as recognised when the network recognised it in at least one
of that lesion's images. For a study (one examination) that becomes: a class is
*reported* when at least ``min_images`` images (default 1) were predicted as that class,
and the *conclusion* is the reported class that comes first in ``priority`` (default
egc_hgin > agc > smt > pu > normal, the configurable ``[outputs] study_priority``).
When no class is reported (possible only with ``min_images`` > 1) the conclusion is
``normal``: nothing was found often enough to name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gastrolens.findings import ImageFinding, LesionClass

DEFAULT_PRIORITY: tuple[LesionClass, ...] = (
    LesionClass.EGC_HGIN,
    LesionClass.AGC,
    LesionClass.SMT,
    LesionClass.PU,
    LesionClass.NORMAL,
)


@dataclass(frozen=True)
class ClassEvidence:
    """One reported class and the images behind it."""

    lesion_class: LesionClass
    image_indices: tuple[int, ...]
    """Positions (0-based, in the order given) of the findings predicted as this class."""
    max_probability: float
    """The highest probability of this class among those findings."""


@dataclass(frozen=True)
class StudyConclusion:
    conclusion: LesionClass
    reported: tuple[ClassEvidence, ...]
    """Every reported class, in priority order (the conclusion's evidence first)."""
    image_count: int

    @property
    def reported_classes(self) -> tuple[LesionClass, ...]:
        return tuple(evidence.lesion_class for evidence in self.reported)


def parse_priority(priority: Sequence[LesionClass | str]) -> tuple[LesionClass, ...]:
    """Turn configured class names into classes; each class must appear exactly once."""
    try:
        classes = tuple(LesionClass(value) for value in priority)
    except ValueError as exc:
        raise ValueError(f"study priority {list(priority)!r}: {exc}") from exc
    if len(classes) != len(LesionClass) or set(classes) != set(LesionClass):
        raise ValueError(
            f"study priority {[c.value for c in classes]!r} must list each of "
            f"{[c.value for c in LesionClass]!r} exactly once"
        )
    return classes


def aggregate_study(
    findings: Iterable[ImageFinding],
    priority: Sequence[LesionClass | str] = DEFAULT_PRIORITY,
    *,
    min_images: int = 1,
) -> StudyConclusion:
    """Apply the per-lesion rule to every image finding of one study."""
    order = parse_priority(priority)
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 1:
        raise ValueError(f"min_images must be an integer >= 1, got {min_images!r}")
    by_class: dict[LesionClass, list[int]] = {cls: [] for cls in LesionClass}
    best: dict[LesionClass, float] = {cls: 0.0 for cls in LesionClass}
    count = 0
    for index, finding in enumerate(findings):
        count += 1
        by_class[finding.predicted].append(index)
        best[finding.predicted] = max(best[finding.predicted], float(finding.probability(finding.predicted)))
    if count == 0:
        raise ValueError("a study conclusion needs at least one image finding")
    reported = tuple(
        ClassEvidence(cls, tuple(by_class[cls]), best[cls])
        for cls in order
        if len(by_class[cls]) >= min_images
    )
    conclusion = reported[0].lesion_class if reported else LesionClass.NORMAL
    return StudyConclusion(conclusion=conclusion, reported=reported, image_count=count)
