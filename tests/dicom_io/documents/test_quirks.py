"""Real-world sources that decode get their SEG, SR and overlay; each repair is a quirk.

Every case here failed before normalise.py (the issue's 2-frame RLE Secondary Capture,
sources without Modality, a misspelled character set, misspelled defined terms, invalid
dates), or wrote what dciodvfy rejects. Each is written both ways (template and
highdicom), must pass dciodvfy, give the same trees, and name its quirk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from gastrolens.dicom_io.documents.outputs import Builder, OutputKind, write_outputs
from gastrolens.errors import OutputError
from gastrolens.findings import LesionClass

from .conftest import assert_dciodvfy_clean, write_fast
from .synthetic import SECONDARY_CAPTURE, VL_ENDOSCOPIC, encode, scenario
from .test_fast_equivalence import tree


def stored(source: Dataset, folder: Path, syntax: str) -> Dataset:
    encode(source, syntax)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    return dcmread(path)


def write_both_ways(tmp_path: Path, source: Dataset, findings, expected_quirk: str) -> dict:
    results = {}
    for builder in Builder:
        if builder is Builder.TEMPLATE:
            written = write_fast(source, findings, tmp_path / builder.value)
        else:
            written = write_outputs(source, findings, tmp_path / builder.value, builder=builder)
        assert {w.kind for w in written} == {OutputKind.SEG, OutputKind.SR, OutputKind.OVERLAY}
        assert any(expected_quirk in quirk for quirk in written.quirks), written.quirks
        for output in written:
            assert_dciodvfy_clean(output.path)
        results[builder] = written
    for ours, theirs in zip(results[Builder.TEMPLATE], results[Builder.HIGHDICOM], strict=True):
        assert tree(dcmread(ours.path)) == tree(dcmread(theirs.path))
    return {w.kind: dcmread(w.path) for w in results[Builder.TEMPLATE]}


def test_two_frame_rle_secondary_capture(tmp_path: Path):
    """The single-frame SC class with NumberOfFrames 2: highdicom refused frame numbers.
    The instance is referenced as a whole (dciodvfy rejects frame numbers for SC) and
    each frame is named in its labels; the overlay is a 2-frame true-colour SC."""
    source, findings = scenario(SECONDARY_CAPTURE, frames=2, lesion=LesionClass.PU)
    source = stored(source, tmp_path / "src", RLELossless)
    assert int(source.NumberOfFrames) == 2 and source.SOPClassUID == SECONDARY_CAPTURE
    outputs = write_both_ways(tmp_path, source, findings, "NumberOfFrames 2 on a single-frame IOD")
    seg = outputs[OutputKind.SEG]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["peptic ulcer (frame 1)", "peptic ulcer (frame 2)"]
    assert outputs[OutputKind.OVERLAY].NumberOfFrames == 2


@pytest.mark.parametrize(
    ("sop_class", "syntax", "modality"),
    [(SECONDARY_CAPTURE, JPEGLSLossless, "OT"), (SECONDARY_CAPTURE, JPEGBaseline8Bit, "OT"),
     (VL_ENDOSCOPIC, ExplicitVRLittleEndian, "ES")],
    ids=["SC-JPEG-LS", "SC-JPEG", "VL"],
)
def test_source_without_modality(tmp_path: Path, sop_class, syntax, modality):
    source, findings = scenario(sop_class, omit=("Modality",))
    source = stored(source, tmp_path / "src", syntax)
    outputs = write_both_ways(tmp_path, source, findings, f"Modality missing: wrote {modality}")
    assert outputs[OutputKind.OVERLAY].Modality == modality


@pytest.mark.parametrize("charset", ["ISO_fR 100", "ISO_IR 999"])
def test_unknown_character_set_is_read_as_the_default_repertoire(tmp_path: Path, charset):
    source, findings = scenario(SECONDARY_CAPTURE, charset=charset, patient_name="Muller^Hans")
    source = stored(source, tmp_path / "src", ExplicitVRLittleEndian)
    outputs = write_both_ways(tmp_path, source, findings, f"SpecificCharacterSet '{charset}' unknown")
    for ds in outputs.values():
        assert "SpecificCharacterSet" not in ds
        assert str(ds.PatientName) == "Muller^Hans"


def test_non_ascii_text_under_an_unknown_character_set_is_replaced(tmp_path: Path):
    source, findings = scenario(SECONDARY_CAPTURE, charset="ISO_IR 100", patient_name="Müller^Hans")
    source = stored(source, tmp_path / "src", ExplicitVRLittleEndian)
    source.SpecificCharacterSet = "ISO_fR 100"
    outputs = write_both_ways(tmp_path, source, findings, "written with '?'")
    assert str(outputs[OutputKind.SR].PatientName) == "M?ller^Hans"


def test_explicit_default_repertoire(tmp_path: Path):
    source, findings = scenario(SECONDARY_CAPTURE, charset="ISO_IR 6", patient_name="Muller^Hans")
    source = stored(source, tmp_path / "src", ExplicitVRLittleEndian)
    outputs = write_both_ways(tmp_path, source, findings, "SpecificCharacterSet 'ISO_IR 6' written as the default")
    assert "SpecificCharacterSet" not in outputs[OutputKind.SEG]


@pytest.mark.parametrize(
    ("keyword", "value", "quirk", "written"),
    [
        ("PatientSex", "MALE", "PatientSex 'MALE' is not a defined term: wrote M", "M"),
        ("PatientSex", "unknown", "PatientSex 'unknown' is not a defined term: wrote empty", ""),
        ("Laterality", "X", "Laterality 'X' is not R or L", ""),
        ("PatientOrientation", ["X", "Y", "Z"], "PatientOrientation", ""),
        ("StudyDate", "2024-03-12", "StudyDate '2024-03-12' is not a valid DA: wrote empty", ""),
        ("PatientBirthDate", "19600230", "PatientBirthDate '19600230' is not a valid DA", ""),
        ("StudyDate", "2024.03.12", "ACR-NEMA form", "20240312"),
        ("StudyTime", "25:00", "StudyTime '25:00' is not a valid TM", ""),
    ],
    ids=["sex-word", "sex-unknown", "laterality", "orientation", "iso-date", "feb-30", "acr-nema-date", "bad-time"],
)
def test_misspelled_terms_and_invalid_dates(tmp_path: Path, keyword, value, quirk, written):
    source, findings = scenario(SECONDARY_CAPTURE)
    setattr(source, keyword, value)
    source = stored(source, tmp_path / "src", ExplicitVRLittleEndian)
    outputs = write_both_ways(tmp_path, source, findings, quirk)
    if keyword != "Laterality":  # highdicom does not copy Laterality into SEG and SR
        for ds in outputs.values():
            assert str(ds.get(keyword, "")) == written


def test_number_of_frames_1_on_a_single_frame_class(tmp_path: Path):
    source, findings = scenario(VL_ENDOSCOPIC)
    source.NumberOfFrames = 1
    source = stored(source, tmp_path / "src", ExplicitVRLittleEndian)
    outputs = write_both_ways(tmp_path, source, findings, "NumberOfFrames 1 on a single-frame IOD: ignored")
    assert "NumberOfFrames" not in outputs[OutputKind.OVERLAY]


def test_a_clean_source_has_no_quirks_and_is_not_copied(tmp_path: Path):
    from gastrolens.dicom_io.documents.normalise import normalise_source

    source, findings = scenario(VL_ENDOSCOPIC)
    normalised = normalise_source(source)
    assert normalised.quirks == () and normalised.header is source
    assert write_outputs(source, findings, tmp_path).quirks == ()


def test_undecodable_images_still_fail_with_a_reason(tmp_path: Path):
    source, findings = scenario(SECONDARY_CAPTURE, omit=("Modality",))
    source.PixelData = source.PixelData[:10]
    with pytest.raises(OutputError, match="cannot draw the overlay: .*cannot decode"):
        write_outputs(source, findings, tmp_path / "out")
