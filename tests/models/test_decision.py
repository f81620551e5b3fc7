"""The decision rule: probabilities and mask -> predicted class, lesion present, mask."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from gastrolens.findings import LesionClass
from gastrolens.models.decision import DecisionRule, area_fraction, bounding_box, decide


def _mask(rows: slice, cols: slice, shape: tuple[int, int] = (100, 100)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def test_bbox_and_area() -> None:
    mask = _mask(slice(10, 20), slice(30, 35))
    assert bounding_box(mask) == (10, 30, 20, 35)
    assert area_fraction(mask) == pytest.approx(50 / 10_000)
    assert bounding_box(np.zeros((5, 5), bool)) is None


def test_classifier_rule_picks_the_most_probable_lesion_class() -> None:
    # normal is the single most probable class, but 1 - p(normal) = 0.6 >= 0.5
    probabilities = (0.4, 0.1, 0.3, 0.1, 0.1)
    outcome = decide(probabilities, _mask(slice(0, 10), slice(0, 10)), DecisionRule())
    assert outcome.lesion_present and outcome.predicted is LesionClass.EGC_HGIN
    assert outcome.bbox == (0, 0, 10, 10) and outcome.lesion_area_fraction == pytest.approx(0.01)


def test_normal_clears_the_mask_by_default() -> None:
    probabilities = (0.9, 0.025, 0.025, 0.025, 0.025)
    outcome = decide(probabilities, _mask(slice(0, 10), slice(0, 10)), DecisionRule())
    assert not outcome.lesion_present and outcome.predicted is LesionClass.NORMAL
    assert not outcome.mask.any() and outcome.bbox is None
    kept = decide(probabilities, _mask(slice(0, 10), slice(0, 10)), DecisionRule(mask_only_when_present=False))
    assert kept.mask.any() and not kept.lesion_present


def test_combine_modes() -> None:
    lesion, normal = (0.1, 0.6, 0.1, 0.1, 0.1), (0.9, 0.025, 0.025, 0.025, 0.025)
    empty, blob = np.zeros((100, 100), bool), _mask(slice(0, 10), slice(0, 10))
    both, either = DecisionRule(combine="both"), DecisionRule(combine="either")
    assert not decide(lesion, empty, both).lesion_present
    assert decide(lesion, blob, both).lesion_present
    assert decide(normal, blob, either).lesion_present
    assert decide(normal, blob, either).predicted is LesionClass.PU
    assert not decide(normal, empty, either).lesion_present


def test_small_masks_are_noise() -> None:
    tiny = _mask(slice(0, 1), slice(0, 2))  # 0.0002 of the frame
    outcome = decide((0.1, 0.6, 0.1, 0.1, 0.1), tiny, DecisionRule(min_area_fraction=0.001))
    assert not outcome.mask.any() and outcome.lesion_area_fraction == 0.0


def test_rule_is_validated() -> None:
    with pytest.raises(ValidationError, match="lesion_threshold"):
        DecisionRule(lesion_threshold=1.5)
    with pytest.raises(ValidationError, match="combine"):
        DecisionRule(combine="majority")
    with pytest.raises(ValueError, match="5 probabilities"):
        decide((0.5, 0.5), np.zeros((4, 4), bool), DecisionRule())
