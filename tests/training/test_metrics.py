"""Metric functions against hand-computed values, including the study's own counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gastrolens.training.metrics import (
    BinaryCounts,
    Proportion,
    confusion_matrix,
    iou,
    lesion_counts,
    lesion_outcomes,
    mask_overlap,
    one_vs_rest,
    roc_auc,
    roc_curve,
    summarise_segmentation,
    wilson_interval,
)


def test_study_counts_give_the_study_percentages() -> None:
    # Table 2, EGC/HGIN: sensitivity 27/32, specificity 6/10, PPV 27/31, NPV 6/11, accuracy 33/42.
    counts = BinaryCounts(tp=27, fn=5, tn=6, fp=4)
    rounded = {name: round(100 * p.value, 1) for name, p in counts.stats().items()}
    assert rounded == {"accuracy": 78.6, "sensitivity": 84.4, "specificity": 60.0, "ppv": 87.1, "npv": 54.5}
    assert (counts.sensitivity.k, counts.sensitivity.n) == (27, 32)
    assert (counts.specificity.k, counts.specificity.n) == (6, 10)
    assert (counts.ppv.k, counts.ppv.n) == (27, 31)
    assert (counts.npv.k, counts.npv.n) == (6, 11)
    assert (counts.accuracy.k, counts.accuracy.n) == (33, 42)
    assert counts.sensitivity.format(ci=False) == "84.4% (27/32)"


def test_wilson_interval_matches_hand_computation() -> None:
    # 27/32 by hand: centre (p + z²/2n)/(1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    low, high = wilson_interval(27, 32)
    assert low == pytest.approx(0.6825, abs=5e-4)
    assert high == pytest.approx(0.9314, abs=5e-4)
    # Textbook values: 0/10 -> [0, 0.2775], 10/10 -> [0.7225, 1], 5/10 -> [0.2366, 0.7634]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-4)
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_proportion_reports_counts_and_interval() -> None:
    p = Proportion(27, 32)
    assert p.to_dict()["k"] == 27 and p.to_dict()["n"] == 32
    assert str(p) == "84.4% (27/32) [68.2-93.1]"
    assert Proportion(0, 0).value is None and str(Proportion(0, 0)) == "n/a (0/0)"


def test_confusion_matrix_and_one_vs_rest() -> None:
    truth = [0, 0, 1, 1, 1, 2, 2, 2, 2]
    predicted = [0, 1, 1, 1, 2, 2, 2, 0, 2]
    matrix = confusion_matrix(truth, predicted, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 3]]
    assert one_vs_rest(matrix, 1) == BinaryCounts(tp=2, fn=1, tn=5, fp=1)
    assert one_vs_rest(matrix, 2) == BinaryCounts(tp=3, fn=1, tn=4, fp=1)
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


def test_confusion_matrix_reproduces_the_study_row() -> None:
    # 32 EGC lesions (27 recognised), 10 others (4 called EGC): rows truth, columns predicted.
    matrix = np.array([[27, 5], [4, 6]])
    counts = one_vs_rest(matrix, 0)
    assert counts == BinaryCounts(tp=27, fn=5, tn=6, fp=4)


def test_per_lesion_rule_any_image_recognises() -> None:
    lesions = ["a", "a", "b", "b", "c", "d"]
    truth = [1, 1, 1, 1, 0, 0]
    predicted = [0, 1, 0, 0, 1, 0]
    outcomes = lesion_outcomes(lesions, truth, predicted)
    assert [(o.lesion, o.recognised) for o in outcomes] == [("a", True), ("b", False), ("c", False), ("d", True)]
    normal, lesion = lesion_counts(outcomes, 2)
    # class 1: a recognised (TP), b missed (FN), c was called 1 on an image (FP), d not (TN)
    assert lesion == BinaryCounts(tp=1, fn=1, tn=1, fp=1)
    # class 0: c missed (FN), d recognised (TP); a and b had an image called 0 (FP)
    assert normal == BinaryCounts(tp=1, fn=1, tn=0, fp=2)
    with pytest.raises(ValueError, match="two classes"):
        lesion_outcomes(["a", "a"], [0, 1], [0, 0])


def test_roc_auc_by_hand() -> None:
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: pos 0.6 vs neg 0.6 -> 0.5; (1 + 0.5 + 1 + 1) / 4
    assert roc_auc([0.2, 0.6, 0.6, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert roc_auc([0.5] * 4, [0, 1, 0, 1]) == pytest.approx(0.5)
    assert roc_auc([0.3, 0.7], [1, 1]) is None
    fpr, tpr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_iou_per_image_and_pooled() -> None:
    truth = np.zeros((4, 4), bool)
    truth[0:2, 0:2] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[0:2, 1:3] = True  # 4 pixels, 2 shared
    assert mask_overlap(pred, truth) == (2, 6)
    assert iou(pred, truth) == pytest.approx(1 / 3)
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) is None
    # image 1: 2/6; image 2: perfect 4/4; image 3: no lesion, 3 false-positive pixels
    summary = summarise_segmentation([2, 4, 0], [6, 4, 3], [4, 4, 0])
    assert summary.mean_iou == pytest.approx((1 / 3 + 1) / 2)
    assert summary.pooled_iou == pytest.approx(6 / 13)
    assert summary.false_positive_masks == 1
    assert summary.images_with_lesion == 2
    empty = summarise_segmentation([0, 0], [4, 4], [4, 4])
    assert empty.mean_iou == 0.0 and empty.pooled_iou == 0.0
    assert math.isclose(sum(summary.per_image), 4 / 3)
