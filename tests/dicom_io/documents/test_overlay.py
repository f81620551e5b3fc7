from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from gastrolens import UNTRAINED_WARNING
from gastrolens.dicom_io.documents.common import save, source_header
from gastrolens.dicom_io.documents.overlay import build_overlay, draw_overlay, label_text, outline
from gastrolens.dicom_io.documents.read import decode_rgb_frames
from gastrolens.dicom_io.documents.uids import instance_uid, series_uid
from gastrolens.errors import OutputError
from gastrolens.findings import LesionClass, OutputKind

from .conftest import assert_dciodvfy_clean
from .synthetic import (
    MULTIFRAME_TRUE_COLOR_SC,
    SECONDARY_CAPTURE,
    TRAINED,
    UNTRAINED,
    VL_ENDOSCOPIC,
    endoscopy_frame,
    lesion_mask,
    make_finding,
    scenario,
)

ROWS, COLS = 120, 160


def pure_red(picture: np.ndarray) -> np.ndarray:
    return (picture[..., 0] == 255) & (picture[..., 1] == 0) & (picture[..., 2] == 0)


def yellow(picture: np.ndarray) -> np.ndarray:
    return (picture[..., 0] > 150) & (picture[..., 1] > 120) & (picture[..., 2] < 60)


def light(picture: np.ndarray) -> np.ndarray:
    """White-ish text pixels: no channel of the reddish mucosa or dark border gets this high."""
    return picture.min(axis=-1) > 150


def test_lesion_is_outlined_in_red_along_its_boundary():
    mask = lesion_mask(ROWS, COLS)
    frame = endoscopy_frame(ROWS, COLS, lesion=mask)
    drawn = draw_overlay(frame, make_finding(mask, LesionClass.PU), TRAINED)
    red = pure_red(drawn)
    assert red.sum() > 100
    near_edge = outline(mask, 9)
    assert not (red & ~near_edge).any(), "red pixels away from the lesion's boundary"
    assert not pure_red(frame).any()


def test_label_is_written_above_the_lesion_and_model_line_at_the_bottom():
    mask = lesion_mask(ROWS, COLS)
    finding = make_finding(mask, LesionClass.PU, confidence=0.91)
    assert label_text(finding) == "peptic ulcer 0.91"
    frame = endoscopy_frame(ROWS, COLS, lesion=mask)
    drawn = draw_overlay(frame, finding, TRAINED)
    row_min = finding.bbox[0]
    label_band = np.abs(drawn[:row_min].astype(int) - frame[:row_min]).sum(axis=-1) > 60
    assert label_band.sum() > 100, "no label above the lesion"
    text = light(drawn)
    assert text[:row_min].sum() > 20 and text[-12:].sum() > 10
    assert not yellow(drawn).any()


def test_untrained_warning_is_burned_in():
    mask = lesion_mask(ROWS, COLS)
    drawn = draw_overlay(endoscopy_frame(ROWS, COLS, lesion=mask), make_finding(mask, model=UNTRAINED), UNTRAINED)
    assert yellow(drawn)[-ROWS // 4 :].sum() > 20


def test_no_lesion_means_no_outline_but_a_label():
    mask = lesion_mask(ROWS, COLS)
    frame = endoscopy_frame(ROWS, COLS)
    finding = make_finding(mask, LesionClass.NORMAL, confidence=0.97)
    drawn = draw_overlay(frame, finding, TRAINED)
    assert not pure_red(drawn).any()
    assert label_text(finding) == "normal gastric mucosa 0.97"
    assert light(drawn)[: ROWS // 4].sum() > 20


@pytest.mark.parametrize("sop_class", [VL_ENDOSCOPIC, SECONDARY_CAPTURE])
def test_overlay_is_a_valid_derived_secondary_capture(tmp_path: Path, artifacts: Path, sop_class):
    source, findings = scenario(sop_class, rows=97, cols=131, model=UNTRAINED)
    header = source_header(source)
    ds = build_overlay(header, decode_rgb_frames(source), findings, UNTRAINED)
    path = save(ds, tmp_path / "overlay.dcm")
    assert_dciodvfy_clean(path)

    back = dcmread(path)
    assert back.SOPClassUID == SECONDARY_CAPTURE
    assert back.SOPInstanceUID == instance_uid(OutputKind.OVERLAY, source.SOPInstanceUID, UNTRAINED.weights_sha256)
    assert back.SeriesInstanceUID == series_uid(OutputKind.OVERLAY, source.StudyInstanceUID, UNTRAINED.weights_sha256)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert (back.PatientName, back.PatientID, back.AccessionNumber) == (
        source.PatientName, source.PatientID, source.AccessionNumber
    )
    assert back.SpecificCharacterSet == source.SpecificCharacterSet
    assert list(back.ImageType) == ["DERIVED", "SECONDARY"]
    assert back.BurnedInAnnotation == "YES"
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "red" in back.DerivationDescription
    assert back.SeriesDescription.startswith(UNTRAINED_WARNING)
    assert UNTRAINED.weights_sha256 in back.ImageComments
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert pure_red(back.pixel_array).any()
    Image.fromarray(back.pixel_array).save(artifacts / f"overlay-unit-{back.Modality}-{sop_class}.png")


def test_multi_frame_source_gives_a_multi_frame_overlay(tmp_path: Path):
    source, findings = scenario(MULTIFRAME_TRUE_COLOR_SC, frames=3)
    ds = build_overlay(source_header(source), decode_rgb_frames(source), findings, TRAINED)
    path = save(ds, tmp_path / "overlay.dcm")
    assert_dciodvfy_clean(path)
    back = dcmread(path)
    assert back.SOPClassUID == MULTIFRAME_TRUE_COLOR_SC and back.NumberOfFrames == 3
    assert list(back.SourceImageSequence[0].ReferencedFrameNumber) == [1, 2, 3]
    reds = [pure_red(frame).any() for frame in back.pixel_array]
    assert reds == [True, False, True]


def test_frames_must_match_the_source():
    source, findings = scenario()
    with pytest.raises(OutputError, match="is not"):
        build_overlay(source_header(source), [np.zeros((5, 5, 3), np.uint8)], findings, TRAINED)


@pytest.mark.parametrize("model", [TRAINED, UNTRAINED], ids=["trained", "untrained"])
@pytest.mark.parametrize("shape", [(480, 640), (33, 47), (120, 90)])
def test_fast_drawing_is_pixel_identical(model, shape):
    """draw_overlay_fast = draw_overlay, lesions anywhere: touching the edges, under the
    model line (the label box then touches it), none at all."""
    from gastrolens.dicom_io.documents.overlay_fast import draw_overlay_fast

    rows, cols = shape
    rng = np.random.default_rng(rows * cols)
    frame = endoscopy_frame(rows, cols, seed=2)
    centers = [(0.0, 0.0), (1.0, 1.0), (0.95, 0.2), (0.5, 0.5), (0.05, 0.9)]
    centers += [tuple(rng.random(2)) for _ in range(5)]
    for center in centers:
        for cls in (LesionClass.AGC, LesionClass.NORMAL):
            mask = lesion_mask(rows, cols, center=center, radii=tuple(0.05 + 0.3 * rng.random(2)))
            finding = make_finding(mask, cls, confidence=float(rng.uniform(0.3, 1.0)), model=model)
            np.testing.assert_array_equal(draw_overlay_fast(frame, finding, model), draw_overlay(frame, finding, model))


@pytest.mark.parametrize("sop_class,frames", [(VL_ENDOSCOPIC, 1), (SECONDARY_CAPTURE, 1),
                                              (MULTIFRAME_TRUE_COLOR_SC, 2)], ids=["VL", "SC", "MF-SC"])
def test_lossy_source_gets_a_jpeg_baseline_overlay_marked_lossy(tmp_path: Path, sop_class, frames):
    """A source whose picture is lossy already gets a JPEG Baseline overlay, its own
    compression recorded; the pixels stay close to the drawing and the outline stays red."""
    source, findings = scenario(sop_class, rows=ROWS, cols=COLS, frames=frames)
    source.LossyImageCompression = "01"  # as an endoscope's JPEG, stored natively by a PACS
    drawn_frames = decode_rgb_frames(source)
    ds = build_overlay(source_header(source), drawn_frames, findings, TRAINED)
    path = save(ds, tmp_path / "overlay.dcm")
    assert_dciodvfy_clean(path)

    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert (back.PhotometricInterpretation, back.SamplesPerPixel, back.PlanarConfiguration) == ("YBR_FULL_422", 3, 0)
    assert back.LossyImageCompression == "01" and back.LossyImageCompressionMethod == "ISO_10918_1"
    streams = [fragment for fragment in _fragments(back)]
    assert len(streams) == frames and all(s[:2] == b"\xff\xd8" for s in streams)
    ratio = frames * ROWS * COLS * 3 / sum(len(s) for s in streams)
    assert float(back.LossyImageCompressionRatio) == pytest.approx(ratio, abs=0.006)
    pictures = back.pixel_array.reshape(frames, ROWS, COLS, 3)
    for picture, frame, finding in zip(pictures, drawn_frames, findings, strict=True):
        expected = draw_overlay(frame, finding, TRAINED)
        assert np.abs(picture.astype(int) - expected).mean() < 4  # quality 95
        if finding.lesion_present:
            reddish = (picture[..., 0] > 180) & (picture[..., 1] < 90) & (picture[..., 2] < 90)
            assert (reddish & pure_red(expected)).sum() > 0.5 * pure_red(expected).sum()
    again = save(build_overlay(source_header(source), drawn_frames, findings, TRAINED), tmp_path / "again.dcm")
    assert dcmread(again).PixelData == back.PixelData  # same pixels, same bytes


def test_lossless_source_keeps_a_native_overlay(tmp_path: Path):
    source, findings = scenario(VL_ENDOSCOPIC, rows=ROWS, cols=COLS)
    source.LossyImageCompression = "00"
    ds = build_overlay(source_header(source), decode_rgb_frames(source), findings, TRAINED)
    back = dcmread(save(ds, tmp_path / "overlay.dcm"))
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and back.PhotometricInterpretation == "RGB"
    assert "LossyImageCompressionMethod" not in back and len(back.PixelData) == ROWS * COLS * 3


def _fragments(ds):
    from pydicom.encaps import generate_frames

    return generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1)))
