import numpy as np
import pytest

from dicom_io.documents.synthetic import make_finding
from gastrolens.config.schema import OutputSettings
from gastrolens.findings import LesionClass
from gastrolens.models.conclusion import DEFAULT_PRIORITY, aggregate_study, parse_priority

N, PU, EGC, AGC, SMT = (LesionClass.NORMAL, LesionClass.PU, LesionClass.EGC_HGIN, LesionClass.AGC, LesionClass.SMT)


def findings(*classes, confidence=0.8):
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    return [make_finding(mask, cls, confidence=confidence) for cls in classes]


def test_a_class_is_reported_when_any_image_shows_it():
    result = aggregate_study(findings(N, N, PU, N))
    assert result.conclusion is PU
    assert result.reported_classes == (PU, N)
    assert result.reported[0].image_indices == (2,)
    assert result.image_count == 4


def test_priority_decides_between_reported_classes():
    result = aggregate_study(findings(PU, SMT, AGC, EGC, N))
    assert result.conclusion is EGC
    assert result.reported_classes == DEFAULT_PRIORITY
    assert aggregate_study(findings(PU, SMT, AGC)).conclusion is AGC


def test_priority_is_configurable_and_matches_the_settings_default():
    assert parse_priority(OutputSettings().study_priority) == DEFAULT_PRIORITY
    result = aggregate_study(findings(EGC, PU), ["pu", "egc_hgin", "agc", "smt", "normal"])
    assert result.conclusion is PU


def test_min_images_makes_the_rule_stricter():
    assert aggregate_study(findings(N, PU), min_images=2).conclusion is N
    assert aggregate_study(findings(N, N, PU, PU), min_images=2).conclusion is PU
    assert aggregate_study(findings(PU, SMT), min_images=2).reported == ()


def test_max_probability_is_kept_per_class():
    a, b = findings(PU, confidence=0.6) + findings(PU, confidence=0.95)
    assert aggregate_study([a, b]).reported[0].max_probability == pytest.approx(0.95)


@pytest.mark.parametrize("priority", [["pu"], ["pu", "pu", "agc", "smt", "normal"],
                                      ["x", "pu", "agc", "smt", "normal"]])
def test_bad_priority_is_refused(priority):
    with pytest.raises(ValueError):
        aggregate_study(findings(PU), priority)


def test_empty_study_and_bad_min_images_are_refused():
    with pytest.raises(ValueError):
        aggregate_study([])
    with pytest.raises(ValueError):
        aggregate_study(findings(PU), min_images=0)
