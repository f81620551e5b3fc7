"""The inference engine on CPU at small input sizes."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gastrolens import UNTRAINED_WARNING
from gastrolens.config.schema import ModelSettings
from gastrolens.errors import ModelError, ModelPackageError
from gastrolens.findings import CLASS_ORDER, LesionClass
from gastrolens.models.decision import DecisionRule
from gastrolens.models.engine import Engine, resolve_device
from gastrolens.models.package import ModelPackage, save_package
from gastrolens.models.preprocess import detect_fov

SIZES = [(96, 128), (150, 100), (64, 64), (33, 200)]


@pytest.fixture(scope="module")
def engine(_tiny_package: ModelPackage) -> Iterator[Engine]:
    """One engine for the tests that leave its weights alone."""
    with Engine(copy.deepcopy(_tiny_package), device="cpu", batch_size=3) as engine:
        yield engine


def _images(sizes: list[tuple[int, int]] = SIZES, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8) for rows, cols in sizes]


def test_mixed_size_batch_gives_findings_at_source_resolution(engine: Engine) -> None:
    findings = engine.infer(_images())
    assert len(findings) == len(SIZES)
    for finding, shape in zip(findings, SIZES, strict=True):
        assert finding.mask.shape == shape and finding.mask.dtype == bool
        assert len(finding.probabilities) == len(CLASS_ORDER)
        assert sum(finding.probabilities) == pytest.approx(1.0, abs=1e-5)
        assert isinstance(finding.predicted, LesionClass)
        assert finding.model == engine.identity and finding.model.untrained
        assert finding.lesion_area_fraction == pytest.approx(finding.mask.mean())
        assert (finding.bbox is None) == (not finding.mask.any())
        assert {"preprocess_s", "classifier_s", "segmenter_s", "postprocess_s"} <= finding.timings.keys()


def test_results_are_deterministic_and_independent_of_batching(
    engine: Engine, _tiny_package: ModelPackage
) -> None:
    images = _images()
    first = engine.infer(images)
    again = engine.infer(images)
    assert [f.probabilities for f in first] == [f.probabilities for f in again]
    with Engine(copy.deepcopy(_tiny_package), device="cpu", batch_size=8) as other:
        together = other.infer(images)
    for a, b in zip(first, together, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        assert a.predicted == b.predicted


def _all_lesion(package: ModelPackage) -> ModelPackage:
    """Make the segmenter call every pixel lesion: zero last layer, large bias."""
    last = package.segmenter.classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(20.0)
    return package


def test_masks_map_back_to_the_field_of_view(
    tiny_package: ModelPackage, make_frame: Callable[..., tuple[np.ndarray, np.ndarray]]
) -> None:
    frame, _ = make_frame(200, 300, (20, 110, 180, 270))
    box = detect_fov(frame)
    rule = DecisionRule(lesion_threshold=0.0)
    with Engine(_all_lesion(tiny_package), device="cpu", decision=rule) as engine:
        (finding,) = engine.infer([frame])
        expected = np.zeros((200, 300), bool)
        expected[box.top : box.bottom, box.left : box.right] = True
        assert np.array_equal(finding.mask, expected)
        assert finding.bbox == (box.top, box.left, box.bottom, box.right)
        assert finding.lesion_present and finding.predicted is not LesionClass.NORMAL
        assert box.left > 90  # the burned-in text at the left was cropped away
    with Engine(_all_lesion(tiny_package), device="cpu", decision=rule, fov_crop=False) as engine:
        assert engine.infer([frame])[0].mask.all()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((64, 64), np.uint8), "image 1: grayscale"),
        (np.zeros((64, 64, 4), np.uint8), "image 1: RGBA"),
        (np.zeros((20, 64, 3), np.uint8), "image 1: 20x64 pixels is smaller than 32"),
        (np.zeros((8200, 40, 3), np.uint8), "image 1: 8200x40 pixels is larger than 8192"),
    ],
)
def test_bad_images_are_clear_errors_and_the_engine_survives(engine: Engine, bad: np.ndarray, message: str) -> None:
    good = _images([(64, 64)])[0]
    with pytest.raises(ModelError, match=message):
        engine.infer([good, bad])
    assert len(engine.infer([good])) == 1


def test_empty_batch(engine: Engine) -> None:
    with pytest.raises(ModelError, match="empty batch"):
        engine.infer([])


def test_stream_pipelines_batches(engine: Engine) -> None:
    batches = [_images([(64, 80)] * 2, seed=1), _images([(70, 64)], seed=2), _images([(90, 90)] * 3, seed=3)]
    results = list(engine.infer_stream(iter(batches)))
    assert [len(r) for r in results] == [2, 1, 3]
    assert results[2][0].mask.shape == (90, 90)
    with pytest.raises(ModelError, match="image 0: RGBA"):
        list(engine.infer_stream([[np.zeros((64, 64, 4), np.uint8)]]))


def test_nan_weights_are_refused(tiny_package: ModelPackage) -> None:
    with torch.no_grad():
        tiny_package.classifier.fc.weight[0, 0] = float("nan")
    with pytest.raises(ModelPackageError, match="classifier: tensor fc.weight holds NaN"):
        Engine(tiny_package, device="cpu")


def test_output_stride_override_and_tensor_entry_points(tiny_package: ModelPackage) -> None:
    with Engine(tiny_package, device="cpu", output_stride=8) as engine:
        assert engine.output_stride == 8
        assert engine.classify_tensor(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
        assert engine.segment_tensor(torch.zeros(2, 3, 65, 65)).shape == (2, 1, 65, 65)
        assert engine.infer(_images([(80, 80)]))[0].mask.shape == (80, 80)


def test_devices() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="not one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_from_settings_without_a_package_warns_untrained(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gastrolens.models.engine"):
        engine = Engine.from_settings(ModelSettings(device="cpu", batch_size=4))
    with engine:
        assert engine.identity.name == "gastrolens-untrained" and engine.untrained
        assert engine.card.classifier.input_size == 512 and engine.card.segmenter.input_size == 513
    assert UNTRAINED_WARNING in caplog.text


def test_from_settings_with_a_package(tiny_package: ModelPackage, tmp_path: Path) -> None:
    card = save_package(tiny_package, tmp_path / "pkg")
    settings = ModelSettings(package=tmp_path / "pkg", device="cpu", batch_size=2, fov_crop=False)
    with Engine.from_settings(settings) as engine:
        assert engine.identity.weights_sha256 == card.weights_sha256
        assert not engine.fov_crop and engine.batch_size == 2
        assert len(engine.infer(_images([(64, 64)] * 3))) == 3
    with pytest.raises(ModelPackageError, match="does not exist"):
        Engine.from_settings(ModelSettings(package=tmp_path / "nowhere", device="cpu"))
