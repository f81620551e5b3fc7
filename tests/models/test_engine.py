"""The inference engine on CPU at small input sizes."""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from gastrolens import UNTRAINED_WARNING
from gastrolens.config.schema import ModelSettings
from gastrolens.errors import DeviceError, ModelError, ModelPackageError
from gastrolens.findings import CLASS_ORDER, LesionClass
from gastrolens.models.decision import DecisionRule
from gastrolens.models.engine import Engine, forward_in_halves, is_sticky_device_error, resolve_device
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


def test_padded_chunks_give_the_same_bits_however_images_are_batched(tiny_package: ModelPackage) -> None:
    images = _images([(64, 80), (90, 70), (100, 100), (64, 64), (80, 120)], seed=4)
    with Engine(copy.deepcopy(tiny_package), device="cpu", batch_size=4, pad_batches=True) as engine:
        together = engine.infer(images)
        alone = [engine.infer([image])[0] for image in images]
        tail = engine.infer(images[3:])
    for a, b in zip(together, alone, strict=True):
        assert a.probabilities == b.probabilities and np.array_equal(a.mask, b.mask)
    assert [f.probabilities for f in tail] == [f.probabilities for f in together[3:]]


def test_the_engine_asks_cudnn_for_deterministic_kernels(tiny_package: ModelPackage) -> None:
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    with Engine(tiny_package, device="cpu") as engine:
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert not engine.pad_batches  # padding costs compute on the CPU and changes nothing there
        assert engine.host_copies == 0


def _raise_from(module: torch.nn.Module, error: BaseException) -> None:
    def hook(*_: object) -> None:
        raise error

    module.register_forward_pre_hook(hook)


def test_a_sticky_device_error_is_a_device_error_not_a_model_error(tiny_package: ModelPackage) -> None:
    with Engine(tiny_package, device="cpu") as engine:
        _raise_from(tiny_package.segmenter, RuntimeError("CUDA error: an illegal memory access was encountered"))
        with pytest.raises(DeviceError, match="must be restarted") as caught:
            engine.infer(_images([(64, 64)]))
        assert not isinstance(caught.value, ModelError)


def test_other_runtime_errors_stay_model_errors(tiny_package: ModelPackage) -> None:
    with Engine(tiny_package, device="cpu") as engine:
        _raise_from(tiny_package.classifier, RuntimeError("shape mismatch"))
        with pytest.raises(ModelError, match="inference failed on a batch of 1 images: shape mismatch"):
            engine.infer(_images([(64, 64)]))


@pytest.mark.parametrize(
    ("error", "sticky"),
    [
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("Expected all tensors to be on the same device"), False),
        (ValueError("CUDA error: in a ValueError"), False),
    ],
)
def test_sticky_device_errors_are_recognised(error: BaseException, sticky: bool) -> None:
    assert is_sticky_device_error(error) is sticky


def test_out_of_memory_retries_in_halves_after_the_except_block() -> None:
    calls: list[tuple[int, bool]] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], sys.exc_info()[0] is not None))
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return x * 2

    x = torch.arange(8.0).reshape(8, 1)
    assert torch.equal(forward_in_halves(run, x), x * 2)
    assert [size for size, _ in calls] == [8, 4, 2, 2, 4, 2, 2]
    assert not any(inside for _, inside in calls)  # no retry ran while an exception was being handled

    def never(x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        forward_in_halves(never, x)
