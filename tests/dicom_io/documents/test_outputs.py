"""The writers end to end: the issue's 'done when', character sets, transfer syntaxes,
multi-frame and grayscale sources, missing attributes, determinism and bad input."""

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

import gastrolens.dicom_io.documents.outputs as outputs_module
from gastrolens import UNTRAINED_WARNING
from gastrolens.config.schema import OutputSettings
from gastrolens.dicom_io.documents import codes
from gastrolens.dicom_io.documents.common import source_was_lossy
from gastrolens.dicom_io.documents.outputs import Builder, OutputKind, PredecessorRef, write_outputs, write_study_sr
from gastrolens.errors import OutputError
from gastrolens.findings import LesionClass

from .conftest import assert_dciodvfy_clean, dcentvfy_errors, dsrdump
from .synthetic import (
    CHINESE_NAME,
    MULTIFRAME_TRUE_COLOR_SC,
    PINYIN_NAME,
    SECONDARY_CAPTURE,
    UNTRAINED,
    VL_ENDOSCOPIC,
    encode,
    make_finding,
    scenario,
)


def by_kind(written):
    return {w.kind: w for w in written}


def check_all(written, source, findings):
    """Every output validates and reads back; returns the outputs by kind."""
    outputs = by_kind(written)
    for output in written:
        assert output.path.exists()
        assert_dciodvfy_clean(output.path)
        ds = dcmread(output.path)
        assert ds.SOPInstanceUID == output.sop_instance_uid
        assert ds.SeriesInstanceUID == output.series_instance_uid
        assert ds.SOPClassUID == output.sop_class_uid
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        jpeg_overlay = output.kind is OutputKind.OVERLAY and source_was_lossy(source)
        assert ds.file_meta.TransferSyntaxUID == (JPEGBaseline8Bit if jpeg_overlay else ExplicitVRLittleEndian)
    if OutputKind.SEG in outputs:
        seg = hd.seg.segread(outputs[OutputKind.SEG].path)
        lesion_frames = [n for n, f in enumerate(findings, start=1) if f.lesion_present]
        if "NumberOfFrames" in source:
            pixels = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=source.SOPInstanceUID,
                source_frame_numbers=lesion_frames,
                segment_numbers=list(range(1, len(lesion_frames) + 1)),
            ).astype(bool)
            for index, frame in enumerate(lesion_frames):
                np.testing.assert_array_equal(pixels[index, ..., index], findings[frame - 1].mask)
        else:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
            )
            np.testing.assert_array_equal(pixels[0, ..., 0].astype(bool), findings[0].mask)
    if OutputKind.SR in outputs:
        path = outputs[OutputKind.SR].path
        dsrdump(path)
        report = hd.sr.srread(path)
        assert len(report.content.get_image_measurement_groups()) == 5 * len(findings)
        rois = report.content.get_planar_roi_measurement_groups()
        assert len(rois) == (len(by_kind_seg_segments(outputs)) if OutputKind.SEG in outputs else 0)
    return outputs


def by_kind_seg_segments(outputs):
    return dcmread(outputs[OutputKind.SEG].path).SegmentSequence


@pytest.mark.parametrize("sop_class", [VL_ENDOSCOPIC, SECONDARY_CAPTURE])
@pytest.mark.parametrize("lesion", [LesionClass.PU, None], ids=["lesion", "no-lesion"])
def test_done_when(tmp_path: Path, artifacts: Path, sop_class, lesion):
    """SEG (lesion only), SR and overlay pass dciodvfy, read back, and the overlay shows
    the red outline and the label (rendered to test-artifacts/dicom_io/)."""
    source, findings = scenario(sop_class, lesion=lesion, rows=480, cols=640, model=UNTRAINED)
    written = write_outputs(source, findings, tmp_path)
    expected = {OutputKind.SR, OutputKind.OVERLAY} | ({OutputKind.SEG} if lesion else set())
    assert {w.kind for w in written} == expected
    outputs = check_all(written, source, findings)

    overlay = dcmread(outputs[OutputKind.OVERLAY].path).pixel_array
    red = (overlay[..., 0] == 255) & (overlay[..., 1] == 0) & (overlay[..., 2] == 0)
    assert red.any() == bool(lesion)
    name = f"overlay-{'VL' if sop_class == VL_ENDOSCOPIC else 'SC'}-{'lesion' if lesion else 'normal'}.png"
    Image.fromarray(overlay).save(artifacts / name)
    for output in written:
        assert UNTRAINED_WARNING in dcmread(output.path).SeriesDescription

    source_path = tmp_path / "source.dcm"
    source.save_as(source_path, enforce_file_format=True)
    assert not dcentvfy_errors([source_path, *(w.path for w in written)])


@pytest.mark.parametrize("charset", ["GB18030", "ISO_IR 192"])
def test_chinese_patient_names_survive_into_every_output(tmp_path: Path, charset):
    name = f"{PINYIN_NAME}={CHINESE_NAME}"
    source, findings = scenario(SECONDARY_CAPTURE, charset=charset, patient_name=name)
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert CHINESE_NAME.encode("gb18030" if charset == "GB18030" else "utf-8") in raw
    source = dcmread(path)
    written = write_outputs(source, findings, tmp_path / "out")
    check_all(written, source, findings)
    for output in written:
        ds = dcmread(output.path)
        assert ds.SpecificCharacterSet == charset
        assert str(ds.PatientName) == name
        assert ds.PatientName.ideographic == CHINESE_NAME
    assert CHINESE_NAME in dsrdump(by_kind(written)[OutputKind.SR].path)


LOSSY = (JPEGBaseline8Bit, JPEG2000)


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
        JPEGLossless,
        JPEGLosslessSV1,
    ],
    ids=lambda uid: uid.keyword,
)
def test_every_accepted_transfer_syntax(tmp_path: Path, syntax):
    source, findings = scenario(VL_ENDOSCOPIC, rows=33, cols=47)
    encode(source, syntax)
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    source = dcmread(path)
    assert source.file_meta.TransferSyntaxUID == syntax
    outputs = check_all(write_outputs(source, findings, tmp_path / "out"), source, findings)
    overlay = dcmread(outputs[OutputKind.OVERLAY].path)
    assert overlay.LossyImageCompression == ("01" if syntax in LOSSY else "00")
    if syntax in LOSSY:  # JPEG Baseline, its own compression recorded (documents/jpeg.py)
        assert overlay.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert overlay.PhotometricInterpretation == "YBR_FULL_422"
        assert overlay.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(overlay.LossyImageCompressionRatio) > 1
    else:
        assert overlay.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert overlay.PhotometricInterpretation == "RGB" and "LossyImageCompressionRatio" not in overlay


def test_multi_frame_source(tmp_path: Path):
    source, findings = scenario(MULTIFRAME_TRUE_COLOR_SC, frames=3)
    outputs = check_all(write_outputs(source, findings, tmp_path), source, findings)
    assert dcmread(outputs[OutputKind.SEG].path).NumberOfFrames == 2
    assert dcmread(outputs[OutputKind.OVERLAY].path).NumberOfFrames == 3


def test_grayscale_source_is_converted_and_still_referenced(tmp_path: Path):
    source, findings = scenario(SECONDARY_CAPTURE, rows=41, cols=57)
    gray = np.frombuffer(source.PixelData, np.uint8).reshape(41, 57, 3)[..., 0].copy()
    source.SamplesPerPixel = 1
    source.PhotometricInterpretation = "MONOCHROME2"
    del source.PlanarConfiguration
    source.PixelData = gray.tobytes()
    outputs = check_all(write_outputs(source, findings, tmp_path), source, findings)
    seg = dcmread(outputs[OutputKind.SEG].path)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    overlay = dcmread(outputs[OutputKind.OVERLAY].path)
    assert overlay.PhotometricInterpretation == "RGB"
    pixels = overlay.pixel_array.astype(int)
    gray_pixels = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
    assert gray_pixels.mean() > 0.5  # everything but the drawing is still gray


def test_missing_optional_attributes(tmp_path: Path):
    source, findings = scenario(
        VL_ENDOSCOPIC,
        omit=("PatientName", "StudyDate", "StudyTime", "AccessionNumber", "SpecificCharacterSet", "InstanceNumber"),
        patient_name=None,
    )
    outputs = check_all(write_outputs(source, findings, tmp_path), source, findings)
    for output in outputs.values():
        ds = dcmread(output.path)
        assert ds.PatientName == "" and ds.AccessionNumber == "" and ds.StudyDate == ""
        assert "SpecificCharacterSet" not in ds or ds.SpecificCharacterSet == "ISO_IR 6"


def test_outputs_are_deterministic_and_replace_each_other(tmp_path: Path):
    source, findings = scenario()
    first = write_outputs(source, findings, tmp_path / "a")
    again = write_outputs(source, findings, tmp_path / "a")
    elsewhere = write_outputs(source, findings, tmp_path / "b")
    def key(written):
        return [(w.kind, w.sop_instance_uid, w.series_instance_uid, w.path.name) for w in written]

    assert key(first) == key(again) == key(elsewhere)
    assert len(list((tmp_path / "a").iterdir())) == 3

    other_model = [make_finding(f.mask, f.predicted, model=UNTRAINED) for f in findings]
    changed = write_outputs(source, other_model, tmp_path / "c")
    assert not {w.sop_instance_uid for w in changed} & {w.sop_instance_uid for w in first}
    assert len({w.sop_instance_uid for w in first}) == len({w.series_instance_uid for w in first}) == 3


def test_settings_switch_outputs_off(tmp_path: Path):
    source, findings = scenario()
    written = write_outputs(source, findings, tmp_path / "a", OutputSettings(overlay=False))
    assert {w.kind for w in written} == {OutputKind.SEG, OutputKind.SR}
    written = write_outputs(source, findings, tmp_path / "b", OutputSettings(seg=False, overlay=False))
    (sr,) = written
    assert hd.sr.srread(sr.path).content.get_planar_roi_measurement_groups() == []
    assert write_outputs(source, findings, tmp_path / "c", OutputSettings(seg=False, sr=False, overlay=False)) == []


def test_decoded_frames_can_be_passed_in(tmp_path: Path):
    source, findings = scenario()
    frames = [np.zeros((33, 47, 3), np.uint8)]
    outputs = by_kind(write_outputs(source, findings, tmp_path, frames=frames))
    overlay = dcmread(outputs[OutputKind.OVERLAY].path).pixel_array
    assert overlay[16, 2].tolist() == [0, 0, 0]


def assert_nothing_written(folder: Path):
    assert not folder.exists() or list(folder.iterdir()) == []


def test_source_without_pixel_data_is_refused(tmp_path: Path):
    source, findings = scenario()
    del source.PixelData
    with pytest.raises(OutputError, match="no pixel data"):
        write_outputs(source, findings, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_mask_of_the_wrong_shape_is_refused(tmp_path: Path):
    source, findings = scenario()
    bad = make_finding(np.ones((10, 10), bool), LesionClass.PU)
    with pytest.raises(OutputError, match=r"mask shape \(10, 10\) does not match"):
        write_outputs(source, [bad], tmp_path / "out")
    with pytest.raises(OutputError, match="1 frame"):
        write_outputs(source, findings * 2, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_undecodable_pixel_data_is_refused(tmp_path: Path):
    source, findings = scenario()
    source.PixelData = source.PixelData[:64]
    with pytest.raises(OutputError, match="cannot draw the overlay"):
        write_outputs(source, findings, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    source, findings = scenario()
    real_save = outputs_module.save

    def failing_save(ds, path, *, fsync=True):
        if path.name.startswith("overlay"):
            def explode(fh):
                fh.write(b"partial")
                raise OSError("disk full")
            from gastrolens.storage.atomic import write_atomic
            write_atomic(path, explode, fsync=fsync)
        return real_save(ds, path, fsync=fsync)

    monkeypatch.setattr(outputs_module, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_outputs(source, findings, tmp_path / "out", builder=Builder.HIGHDICOM)
    assert_nothing_written(tmp_path / "out")


def test_a_failed_fast_write_leaves_nothing_behind(tmp_path: Path, monkeypatch):
    source, findings = scenario()
    write_outputs(source, findings, tmp_path / "warm")  # the next one compiles and takes the template path
    real_write = outputs_module.write_atomic

    def failing_write(path, write, *, fsync=True):
        if path.name.startswith("overlay"):
            def explode(fh):
                fh.write(b"partial")
                raise OSError("disk full")
            return real_write(path, explode, fsync=fsync)
        return real_write(path, write, fsync=fsync)

    monkeypatch.setattr(outputs_module, "write_atomic", failing_write)
    with pytest.raises(OutputError, match="disk full"):
        write_outputs(source, findings, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_study_sr_end_to_end(tmp_path: Path):
    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    study = [
        scenario(VL_ENDOSCOPIC, lesion=LesionClass.PU, study_uid=study_uid),
        scenario(SECONDARY_CAPTURE, lesion=LesionClass.EGC_HGIN, study_uid=study_uid),
        scenario(MULTIFRAME_TRUE_COLOR_SC, lesion=None, frames=2, study_uid=study_uid),
    ]
    first = write_study_sr(study, tmp_path)
    assert first.conclusion.conclusion is LesionClass.EGC_HGIN
    assert_dciodvfy_clean(first.output.path)
    assert "Early gastric cancer" in dsrdump(first.output.path)
    hd.sr.srread(first.output.path)

    settings = OutputSettings(study_priority=("pu", "egc_hgin", "agc", "smt", "normal"))
    second = write_study_sr(
        study,
        tmp_path,
        settings,
        revision=2,
        predecessor=PredecessorRef(first.output.sop_instance_uid, first.output.series_instance_uid),
    )
    assert second.conclusion.conclusion is LesionClass.PU
    assert second.output.sop_instance_uid != first.output.sop_instance_uid
    assert second.output.series_instance_uid == first.output.series_instance_uid
    assert_dciodvfy_clean(second.output.path)
    report = hd.sr.srread(second.output.path)
    conclusion = report.content.get_image_measurement_groups()[-1].get_qualitative_evaluations()[0]
    assert codes.class_from_code(conclusion.value) is LesionClass.PU
    predecessor = report.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == (
        first.output.sop_instance_uid
    )
    assert write_study_sr(study, tmp_path).output.sop_instance_uid == first.output.sop_instance_uid


def test_study_sr_names_every_model(tmp_path: Path):
    """A model replaced while the study was open: one study SR naming both models; each
    class group carries the model that judged its images; UIDs keyed by both hashes."""
    from gastrolens.dicom_io.documents.uids import study_sr_instance_uid

    from .synthetic import TRAINED

    study_uid = "1.2.826.0.1.3680043.8.498.4243"
    study = [scenario(study_uid=study_uid), scenario(study_uid=study_uid, model=UNTRAINED)]
    report = write_study_sr(study, tmp_path)
    assert_dciodvfy_clean(report.output.path)
    dsrdump(report.output.path)
    text = report.output.path.read_bytes()
    for model in (TRAINED, UNTRAINED):
        assert f"weights_sha256={model.weights_sha256}".encode() in text
        assert report.output.sop_instance_uid != study_sr_instance_uid(study_uid, model.weights_sha256, 1)
    assert UNTRAINED_WARNING in dcmread(report.output.path).SeriesDescription
    groups = hd.sr.srread(report.output.path).content.get_image_measurement_groups()
    peptic = [g for g in groups if g.finding_type and codes.class_from_code(g.finding_type) is LesionClass.PU]
    assert len(peptic) == 2  # one per model
    assert write_study_sr(study, tmp_path / "again").output.sop_instance_uid == report.output.sop_instance_uid
    single = write_study_sr(study[:1], tmp_path / "one")
    assert single.output.sop_instance_uid == study_sr_instance_uid(study_uid, TRAINED.weights_sha256, 1)


def test_a_non_boolean_mask_is_refused(tmp_path: Path):
    source, findings = scenario()
    finding = make_finding(findings[0].mask, LesionClass.PU)
    object.__setattr__(finding, "mask", finding.mask.astype(np.uint8))
    with pytest.raises(OutputError, match="boolean numpy array, got uint8 array"):
        write_outputs(source, [finding], tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
