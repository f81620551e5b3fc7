"""The engine on a real CUDA device (``pytest -m gpu``); skipped where CUDA is absent.

The CPU-side tests check the logic of each GPU path; these check that the paths run
on a GPU and agree with the CPU reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch

from gastrolens.models.batching import fov_boxes, masks_to_host
from gastrolens.models.engine import Engine
from gastrolens.models.package import ModelPackage
from gastrolens.models.precision import amp_dtype, native_bf16
from gastrolens.models.preprocess import CropBox, detect_fov, mask_to_source

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

Frame = Callable[..., tuple[np.ndarray, np.ndarray]]


def _frames(make_frame: Frame, n: int = 6) -> list[np.ndarray]:
    return [make_frame(200 + 9 * i, 300 + 13 * i, (20, 110, 180 + i, 270 + i), seed=i)[0] for i in range(n)]


def test_fov_on_the_gpu_matches_the_host(make_frame: Frame) -> None:
    frames = _frames(make_frame)
    boxes = fov_boxes([torch.from_numpy(f).cuda() for f in frames], threshold=20)
    assert boxes == [detect_fov(f) for f in frames]


def test_masks_on_the_gpu_match_the_host() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 33, 33) * 3
    boxes, shapes = [CropBox(3, 4, 90, 100), CropBox(0, 0, 64, 64)], [(100, 110), (64, 64)]
    for got, logit, box, shape in zip(masks_to_host(logits.cuda(), boxes, shapes, threshold=0.0), logits, boxes,
                                      shapes, strict=True):
        assert (got.mask != mask_to_source(logit, box, shape)).mean() < 0.002  # bilinear on another device


@pytest.mark.parametrize("amp", ["off", "fp16", "auto"])
def test_engine_on_cuda_agrees_with_the_cpu(tiny_package: ModelPackage, make_frame: Frame, amp: str) -> None:
    frames = _frames(make_frame, 5)
    with Engine(copy.deepcopy(tiny_package), device="cpu", batch_size=4) as cpu:
        reference = cpu.infer(frames)
    with Engine(tiny_package, device="cuda", batch_size=4, amp=amp) as gpu:
        assert gpu.pad_batches and not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert gpu.amp_dtype is amp_dtype(amp, gpu.device)
        before = gpu.host_copies
        findings = gpu.infer(frames)
        assert gpu.host_copies - before == 2  # one copy per batch of 4
        again = [gpu.infer([frame])[0] for frame in frames]
    tolerance = 1e-4 if amp == "off" else 0.05
    for a, b, c in zip(reference, findings, again, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=tolerance)
        assert b.probabilities == c.probabilities and np.array_equal(b.mask, c.mask)  # bits independent of batching


def test_native_bf16_is_asked_without_emulation() -> None:
    device = torch.device("cuda:0")
    assert native_bf16(device) == (torch.cuda.get_device_capability(0) >= (8, 0))


def test_staging_keeps_a_buffer_until_its_copy_is_done() -> None:
    from gastrolens.models.batching import Staging

    staging = Staging(torch.device("cuda:0"))
    batches = [[np.full((64, 80, 3), value, np.uint8)] for value in (1, 2, 3)]
    first = staging.pack(batches[0])
    second = staging.pack(batches[1])  # packed before the first is uploaded, as the engine's thread does
    assert first.slot != second.slot
    on_device = [staging.upload(first), staging.upload(second)]
    third = staging.pack(batches[2])  # reuses the first slot once its copy completed
    assert third.slot == first.slot
    torch.cuda.synchronize()
    assert [int(frames[0][0, 0, 0]) for frames in on_device] == [1, 2]
    assert staging.copies == 2


def test_nvjpeg_decoding_against_pydicoms_decoder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Whether torchvision's nvJPEG decoder could replace the CPU one: held to the same parity."""
    from pydicom import dcmread
    from pydicom.encaps import generate_frames
    from torchvision.io import decode_jpeg

    from gastrolens.daemon.decoding import PARITY_MAX_LEVELS
    from gastrolens.dicom_io.documents.read import decode_rgb_frames
    from gastrolens.samples import as_dicom, endoscopy_frame

    path = tmp_path / "hd.dcm"
    as_dicom(endoscopy_frame(1080, 1350, None, seed=5)[0], jpeg_quality=90).save_as(path, enforce_file_format=True)
    ds = dcmread(path)
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    decoded = decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8), device="cuda")
    gpu = decoded.permute(1, 2, 0).cpu().numpy().astype(int)
    reference = decode_rgb_frames(ds)[0].astype(int)
    assert gpu.shape == reference.shape
    assert np.abs(gpu - reference).max() <= PARITY_MAX_LEVELS
