"""Decoding in worker processes beside inference, and a device that fails for good."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from gastrolens import metrics
from gastrolens.daemon.decoding import decode_instance, decode_process_count
from gastrolens.daemon.pipeline import InferenceStep
from gastrolens.db.states import InstanceState
from gastrolens.db.tables import Instance
from gastrolens.errors import DeviceError
from gastrolens.findings import ImageFinding
from gastrolens.models import Engine, untrained_package
from gastrolens.samples import as_dicom, endoscopy_frame


def states(stage) -> dict[InstanceState, int]:  # type: ignore[no-untyped-def]
    with stage.db.session() as s:
        return dict(s.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())


def stage_cpu(stage: metrics.Stage) -> float:
    return float(metrics.REGISTRY.get_sample_value("gastrolens_stage_cpu_seconds_total", {"stage": stage.value}) or 0)


def test_process_count_follows_the_cores() -> None:
    assert decode_process_count(None, cpus=16) == 16
    assert decode_process_count(None, cpus=128) == 32
    assert decode_process_count(None, cpus=1) == 1
    assert decode_process_count(0, cpus=16) == 0
    assert decode_process_count(3, cpus=16) == 3


def test_decode_instance_never_raises(tmp_path: Path) -> None:
    frame, _ = endoscopy_frame(60, 80, None, seed=0)
    as_dicom(frame, jpeg_quality=90).save_as(tmp_path / "good.dcm", enforce_file_format=True)
    (tmp_path / "bad.dcm").write_bytes(b"not dicom at all")
    good = decode_instance(tmp_path / "good.dcm")
    assert good.error is None and good.dataset is not None and good.cpu_seconds > 0
    assert [f.shape for f in good.frames] == [(60, 80, 3)] and good.frames[0].dtype == np.uint8
    bad = decode_instance(tmp_path / "bad.dcm")
    assert bad.error is not None and bad.error.startswith("cannot decode") and bad.frames == []
    missing = decode_instance(tmp_path / "nowhere.dcm")
    assert missing.error is not None


class _Watching:
    """An engine stand-in that notes how many instances had left the queue when it was called."""

    def __init__(self, engine: Engine, stage) -> None:  # type: ignore[no-untyped-def]
        self.engine, self.stage, self.claimed_at_call = engine, stage, []  # type: ignore[var-annotated]

    def infer(self, frames: list[np.ndarray]) -> list[ImageFinding]:
        self.claimed_at_call.append(5 - states(self.stage).get(InstanceState.RECEIVED, 0))
        return self.engine.infer(frames)


def test_drain_decodes_the_next_batch_in_processes_while_this_one_is_inferred(make_stage, tiny_engine, study_uid):
    stage = make_stage(model={"batch_size": 2},
                       scheduler={"study_quiet_seconds": 0, "lease_seconds": 60, "output_processes": 0,
                                  "decode_processes": 1})
    for i in range(5):
        stage.receive(study_uid, seed=i)
    watching = _Watching(tiny_engine, stage)
    step = InferenceStep(stage.settings, stage.db, stage.store, watching, "w")  # type: ignore[arg-type]
    decode_before, infer_before = stage_cpu(metrics.Stage.DECODE), stage_cpu(metrics.Stage.INFER)
    try:
        assert step.drain(lambda: False) == 5
    finally:
        step.close()
    assert states(stage) == {InstanceState.DONE: 5}
    # batch 1 inferred while batch 2 was claimed (and decoding); batch 2 while batch 3 was
    # (without the overlap: [2, 4, 5])
    assert watching.claimed_at_call == [4, 5, 5]
    assert stage_cpu(metrics.Stage.DECODE) > decode_before  # reported back from the worker process
    assert stage_cpu(metrics.Stage.INFER) > infer_before


def test_a_failed_device_fails_no_image_and_stops_claiming(make_stage, study_uid):
    stage = make_stage(model={"batch_size": 2},
                       scheduler={"study_quiet_seconds": 0, "lease_seconds": 60, "output_processes": 0,
                                  "decode_processes": 0})
    for i in range(3):
        stage.receive(study_uid, seed=i)
    package = untrained_package(classifier_input_size=64, segmenter_input_size=65)
    engine = Engine(package, device="cpu", batch_size=2)

    def hook(*_: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    package.classifier.register_forward_pre_hook(hook)
    step = InferenceStep(stage.settings, stage.db, stage.store, engine, "w")
    try:
        with pytest.raises(DeviceError):
            step.drain(lambda: False)
        assert step.device_failed is not None
        assert states(stage) == {InstanceState.RECEIVED: 3}, "no image failed; every claim was handed back"
        with pytest.raises(DeviceError):
            step.drain(lambda: False)
        assert states(stage) == {InstanceState.RECEIVED: 3}, "nothing more was claimed"
    finally:
        step.close()
        engine.close()
    assert torch.backends.cudnn.deterministic


def _jpeg_instance(frames: list[np.ndarray], *, quality: int = 90):  # type: ignore[no-untyped-def]
    """A multi-frame JPEG Baseline YBR_FULL_422 instance, each frame encoded by Pillow."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = as_dicom(frames[0], jpeg_quality=quality)
    streams = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality, subsampling="4:2:2")
        streams.append(buffer.getvalue())
    ds.PixelData = encapsulate(streams)
    ds.NumberOfFrames = len(frames)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422"
    return ds


def _reread(ds, tmp_path: Path):  # type: ignore[no-untyped-def]
    from pydicom import dcmread

    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path), path


@pytest.mark.parametrize(("rows", "cols"), [(60, 80), (480, 640), (1080, 1350)])
def test_fast_jpeg_path_matches_pydicoms_decoder(tmp_path: Path, rows: int, cols: int) -> None:
    from gastrolens.daemon.decoding import PARITY_MAX_LEVELS, jpeg_baseline_frames
    from gastrolens.dicom_io.documents.read import decode_rgb_frames

    ds, path = _reread(as_dicom(endoscopy_frame(rows, cols, None, seed=rows)[0], jpeg_quality=90), tmp_path)
    fast = jpeg_baseline_frames(ds)
    reference = decode_rgb_frames(ds)
    assert fast is not None and len(fast) == len(reference) == 1
    difference = np.abs(fast[0].astype(int) - reference[0].astype(int))
    assert fast[0].shape == reference[0].shape and fast[0].dtype == np.uint8 and fast[0].flags.writeable
    assert difference.max() <= PARITY_MAX_LEVELS and difference.mean() < 0.5
    decoded = decode_instance(path)  # the daemon's decoder takes the fast path
    assert np.array_equal(decoded.frames[0], fast[0])


def test_fast_jpeg_path_multi_frame(tmp_path: Path) -> None:
    from gastrolens.daemon.decoding import PARITY_MAX_LEVELS, jpeg_baseline_frames
    from gastrolens.dicom_io.documents.read import decode_rgb_frames

    frames = [endoscopy_frame(96, 128, None, seed=i)[0] for i in range(3)]
    ds, _ = _reread(_jpeg_instance(frames), tmp_path)
    fast = jpeg_baseline_frames(ds)
    reference = decode_rgb_frames(ds)
    assert fast is not None and len(fast) == len(reference) == 3
    for a, b in zip(fast, reference, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= PARITY_MAX_LEVELS


def test_fast_jpeg_path_declines_what_it_is_not_sure_of(tmp_path: Path) -> None:
    from gastrolens.daemon.decoding import jpeg_baseline_frames

    frame = endoscopy_frame(64, 80, None, seed=0)[0]
    native, _ = _reread(as_dicom(frame), tmp_path)  # uncompressed RGB
    assert jpeg_baseline_frames(native) is None
    wrong_size, _ = _reread(as_dicom(frame, jpeg_quality=90), tmp_path)
    wrong_size.Rows = 65
    assert jpeg_baseline_frames(wrong_size) is None
    wrong_count, _ = _reread(_jpeg_instance([frame, frame]), tmp_path)
    wrong_count.NumberOfFrames = 3
    assert jpeg_baseline_frames(wrong_count) is None
    rgb_said, _ = _reread(as_dicom(frame, jpeg_quality=90), tmp_path)
    rgb_said.PhotometricInterpretation = "RGB"
    assert jpeg_baseline_frames(rgb_said) is None
