"""The serving precision: which dtype [model] amp picks, and validating a package in it."""

from __future__ import annotations

import copy

import pytest
import torch

from gastrolens.config.schema import ModelSettings
from gastrolens.errors import ModelError, ModelPackageError
from gastrolens.models.engine import Engine
from gastrolens.models.package import ModelPackage
from gastrolens.models.precision import amp_dtype, check_served_precision, native_bf16

CUDA = torch.device("cuda:0")
CPU = torch.device("cpu")


def _native(answer: bool):  # type: ignore[no-untyped-def]
    return lambda device: answer


@pytest.mark.parametrize(
    ("setting", "native", "expected"),
    [
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float16),  # V100 / T4: emulated bf16 is not used, fp16 is
        ("fp16", True, torch.float16),
        ("fp16", False, torch.float16),
        ("bf16", True, torch.bfloat16),
        ("off", True, None),
        (True, False, torch.float16),
        (False, True, None),
    ],
)
def test_amp_setting_picks_the_dtype(setting: str | bool, native: bool, expected: torch.dtype | None) -> None:
    assert amp_dtype(setting, CUDA, bf16=_native(native)) is expected


def test_bf16_without_native_support_is_refused() -> None:
    with pytest.raises(ModelError, match="no native bf16"):
        amp_dtype("bf16", CUDA, bf16=_native(False))
    with pytest.raises(ModelError, match="not one of"):
        amp_dtype("fp8", CUDA, bf16=_native(True))


@pytest.mark.parametrize("setting", ["auto", "fp16", "bf16", "off"])
def test_the_cpu_serves_fp32(setting: str) -> None:
    assert amp_dtype(setting, CPU, bf16=_native(True)) is None
    assert not native_bf16(CPU)


def test_the_engine_takes_amp_from_the_settings(tiny_package: ModelPackage) -> None:
    assert ModelSettings().amp == "auto"
    with Engine(tiny_package, device="cpu", amp="fp16") as engine:
        assert engine.amp_dtype is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_sound_package_validates_in_reduced_precision(tiny_package: ModelPackage, dtype: torch.dtype) -> None:
    worst = check_served_precision(tiny_package.classifier.eval(), tiny_package.segmenter.eval(), classifier_size=64,
                                   segmenter_size=65, device=CPU, dtype=dtype, what="tiny")
    assert 0.0 <= worst <= 0.05


def test_a_package_that_overflows_fp16_is_refused(tiny_package: ModelPackage) -> None:
    with torch.no_grad():
        tiny_package.classifier.fc.weight.mul_(1e5)  # logits beyond fp16's 65,504
    classifier, segmenter = tiny_package.classifier.eval(), tiny_package.segmenter.eval()
    assert check_served_precision(copy.deepcopy(classifier), segmenter, classifier_size=64, segmenter_size=65,
                                  device=CPU, dtype=None, what="tiny") == 0.0
    with pytest.raises(ModelPackageError, match="the classifier overflows in fp16"):
        check_served_precision(classifier, segmenter, classifier_size=64, segmenter_size=65, device=CPU,
                               dtype=torch.float16, what="tiny")


def test_a_package_that_rounds_away_its_decisions_is_refused(tiny_package: ModelPackage) -> None:
    with pytest.raises(ModelPackageError, match=r"the classifier differs by .* between fp32 and bf16"):
        check_served_precision(tiny_package.classifier.eval(), tiny_package.segmenter.eval(), classifier_size=64,
                               segmenter_size=65, device=CPU, dtype=torch.bfloat16, what="tiny", tolerance=1e-9)
