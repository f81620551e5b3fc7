from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from gastrolens.dicom_io.documents import codes
from gastrolens.dicom_io.documents.common import check_findings, save, source_header
from gastrolens.dicom_io.documents.seg import build_segmentation
from gastrolens.dicom_io.documents.uids import instance_uid, series_uid
from gastrolens.findings import LesionClass, OutputKind

from .conftest import assert_dciodvfy_clean
from .synthetic import MULTIFRAME_TRUE_COLOR_SC, SECONDARY_CAPTURE, TRAINED, VL_ENDOSCOPIC, make_finding, scenario


def build(source, findings):
    return build_segmentation(source_header(source), findings, check_findings(source, findings))


@pytest.mark.parametrize("sop_class", [VL_ENDOSCOPIC, SECONDARY_CAPTURE])
def test_single_frame_seg_round_trips_and_validates(tmp_path: Path, sop_class):
    source, findings = scenario(sop_class, lesion=LesionClass.EGC_HGIN)
    seg, segments = build(source, findings)
    path = save(seg, tmp_path / "seg.dcm")
    assert_dciodvfy_clean(path)

    back = hd.seg.segread(path)
    assert back.SOPInstanceUID == instance_uid(OutputKind.SEG, source.SOPInstanceUID, TRAINED.weights_sha256)
    assert back.SeriesInstanceUID == series_uid(OutputKind.SEG, source.StudyInstanceUID, TRAINED.weights_sha256)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.PatientName == source.PatientName and back.PatientID == source.PatientID
    assert back.SpecificCharacterSet == source.SpecificCharacterSet
    assert "PatientOrientation" in back
    assert back.NumberOfFrames == 1 and back.SegmentationType == "BINARY"
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.get_source_image_uids() == [
        (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)
    ]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[0, ..., 0].astype(bool), findings[0].mask)

    (segment,) = back.SegmentSequence
    assert segments[0].tracking_uid == segment.TrackingUID
    assert segment.SegmentLabel == LesionClass.EGC_HGIN.display_name
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("EGC-HGIN", codes.LOCAL_SCHEME)
    assert segment.AnatomicRegionSequence[0].CodeValue == codes.STOMACH.value
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (TRAINED.name, TRAINED.version)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert TRAINED.weights_sha256 in algorithm.AlgorithmParameters
    assert back.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.LOCAL_SCHEME
    assert TRAINED.name in back.SeriesDescription
    assert TRAINED.weights_sha256 in back.ImageComments


def test_each_study_class_gets_its_segment_type():
    for cls in (LesionClass.PU, LesionClass.AGC, LesionClass.SMT):
        source, findings = scenario(lesion=cls)
        seg, _ = build(source, findings)
        prop = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
        assert prop.CodeValue == codes.class_code(cls).value


def test_multi_frame_source_has_one_segment_per_lesion_frame(tmp_path: Path):
    source, findings = scenario(MULTIFRAME_TRUE_COLOR_SC, frames=3)
    seg, segments = build(source, findings)
    path = save(seg, tmp_path / "seg.dcm")
    assert_dciodvfy_clean(path)
    assert [(s.source_frame, s.segment_number) for s in segments] == [(1, 1), (3, 2)]

    back = hd.seg.segread(path)
    assert back.NumberOfFrames == 2
    referenced = [
        item.DerivationImageSequence[0].SourceImageSequence[0] for item in back.PerFrameFunctionalGroupsSequence
    ]
    assert [int(ref.ReferencedFrameNumber) for ref in referenced] == [1, 3]
    assert {ref.ReferencedSOPClassUID for ref in referenced} == {MULTIFRAME_TRUE_COLOR_SC}
    assert back.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID == (
        MULTIFRAME_TRUE_COLOR_SC
    )
    pixels = back.get_pixels_by_source_frame(
        source_sop_instance_uid=source.SOPInstanceUID, source_frame_numbers=[1, 3], segment_numbers=[1, 2]
    ).astype(bool)
    np.testing.assert_array_equal(pixels[0, ..., 0], findings[0].mask)
    np.testing.assert_array_equal(pixels[1, ..., 1], findings[2].mask)
    assert not pixels[0, ..., 1].any() and not pixels[1, ..., 0].any()
    assert "(frame 3)" in back.SegmentSequence[1].SegmentLabel


def test_a_multi_frame_source_with_one_lesion_frame(tmp_path: Path):
    source, findings = scenario(MULTIFRAME_TRUE_COLOR_SC, frames=3, lesion=None)
    findings[1] = make_finding(np.ones_like(findings[1].mask), LesionClass.SMT)
    seg, segments = build(source, findings)
    path = save(seg, tmp_path / "seg.dcm")
    assert_dciodvfy_clean(path)
    back = hd.seg.segread(path)
    groups = back.SharedFunctionalGroupsSequence[0]
    if "DerivationImageSequence" not in groups:
        groups = back.PerFrameFunctionalGroupsSequence[0]
    assert groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber == 2


def test_no_seg_without_a_lesion():
    source, findings = scenario(lesion=None)
    assert build(source, findings) is None


def test_no_seg_when_the_lesion_has_an_empty_mask():
    source, findings = scenario(lesion=LesionClass.PU)
    empty = findings[0].mask & False
    finding = make_finding(findings[0].mask, LesionClass.PU)
    object.__setattr__(finding, "mask", empty)
    assert build(source, [finding]) is None


def test_a_mask_with_normal_class_is_a_generic_lesion():
    source, findings = scenario(lesion=LesionClass.PU)
    finding = findings[0]
    object.__setattr__(finding, "predicted", LesionClass.NORMAL)
    seg, segments = build(source, [finding])
    assert segments[0].lesion_class is None
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.LESION.value
