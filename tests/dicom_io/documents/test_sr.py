from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread

from gastrolens import UNTRAINED_WARNING
from gastrolens.dicom_io.documents import codes
from gastrolens.dicom_io.documents.common import check_findings, save, source_header
from gastrolens.dicom_io.documents.seg import build_segmentation
from gastrolens.dicom_io.documents.sr import PredecessorRef, build_image_sr
from gastrolens.dicom_io.documents.study_sr import build_study_sr
from gastrolens.dicom_io.documents.uids import instance_uid, study_sr_instance_uid, study_sr_series_uid
from gastrolens.errors import OutputError
from gastrolens.findings import CLASS_ORDER, LesionClass, OutputKind
from gastrolens.models.conclusion import aggregate_study

from .conftest import assert_dciodvfy_clean, dsrdump
from .synthetic import MULTIFRAME_TRUE_COLOR_SC, SECONDARY_CAPTURE, TRAINED, UNTRAINED, VL_ENDOSCOPIC, scenario


def write_image_sr(tmp_path: Path, source, findings, with_seg: bool = True):
    header = source_header(source)
    model = check_findings(source, findings)
    seg, segments = (build_segmentation(header, findings, model) or (None, [])) if with_seg else (None, [])
    path = save(build_image_sr(header, findings, model, seg, segments), tmp_path / "sr.dcm")
    return path, seg


def text_values(ds) -> list[str]:
    """Every TEXT item's value anywhere in the content tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(item.TextValue)
        found.extend(text_values(item))
    return found


def probabilities(report: hd.sr.ComprehensiveSR) -> dict[tuple[int, LesionClass], float]:
    """(frame, class) -> Probability, read from the image-level TID 1501 groups."""
    found = {}
    for group in report.content.get_image_measurement_groups():
        cls = codes.class_from_code(group.finding_type)
        (source,) = group.source_images
        frame = int(source.ReferencedSOPSequence[0].get("ReferencedFrameNumber", 1))
        (probability,) = group.get_measurements(name=codes.PROBABILITY)
        found[(frame, cls)] = probability.value
    return found


@pytest.mark.parametrize("sop_class", [VL_ENDOSCOPIC, SECONDARY_CAPTURE])
def test_image_sr_reports_finding_probabilities_area_and_segment(tmp_path: Path, sop_class):
    source, findings = scenario(sop_class, lesion=LesionClass.AGC)
    path, seg = write_image_sr(tmp_path, source, findings)
    assert_dciodvfy_clean(path)
    tree = dsrdump(path)
    assert "Advanced gastric cancer" in tree and "Probability" in tree and "Referenced Segmentation Frame" in tree
    assert "Both Referenced Frame Number and Referenced Segment Number" not in tree

    report = hd.sr.srread(path)
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    assert report.SOPInstanceUID == instance_uid(OutputKind.SR, source.SOPInstanceUID, TRAINED.weights_sha256)
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.PatientName == source.PatientName
    got = probabilities(report)
    assert set(got) == {(1, cls) for cls in CLASS_ORDER}
    for cls in CLASS_ORDER:
        assert got[(1, cls)] == pytest.approx(findings[0].probability(cls))

    finding_group = next(
        g for g in report.content.get_image_measurement_groups() if g.tracking_identifier == "frame 1 finding"
    )
    assert codes.class_from_code(finding_group.finding_type) is LesionClass.AGC
    (area,) = finding_group.get_measurements(name=codes.LESION_AREA_FRACTION)
    assert area.value == pytest.approx(findings[0].lesion_area_fraction)
    assert finding_group.source_images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    (roi,) = report.content.get_planar_roi_measurement_groups()
    ref = roi.referenced_segmentation_frame[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID and int(ref.ReferencedFrameNumber) == 1
    assert "ReferencedSegmentNumber" not in ref
    assert roi.tracking_uid == seg.SegmentSequence[0].TrackingUID

    raw = dcmread(path)
    texts = text_values(raw)
    assert f"weights_sha256={TRAINED.weights_sha256}" in texts  # TID 4019 Algorithm Parameters
    assert TRAINED.name in texts and TRAINED.version in texts
    assert UNTRAINED_WARNING not in texts and UNTRAINED_WARNING not in raw.SeriesDescription


def test_untrained_model_warning_is_a_text_item_and_in_the_series_description(tmp_path: Path):
    source, findings = scenario(lesion=LesionClass.PU, model=UNTRAINED)
    path, _ = write_image_sr(tmp_path, source, findings)
    assert_dciodvfy_clean(path)
    assert "Qualitative Evaluations" in dsrdump(path)
    raw = dcmread(path)
    assert UNTRAINED_WARNING in text_values(raw)
    assert raw.SeriesDescription.startswith(UNTRAINED_WARNING)
    container = next(
        item for item in raw.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    )
    assert container.ContentSequence[0].TextValue == UNTRAINED_WARNING
    hd.sr.srread(path)


def test_image_sr_without_lesion_has_no_segment_reference(tmp_path: Path):
    source, findings = scenario(lesion=None)
    path, seg = write_image_sr(tmp_path, source, findings)
    assert seg is None
    assert_dciodvfy_clean(path)
    report = hd.sr.srread(path)
    assert report.content.get_planar_roi_measurement_groups() == []
    assert probabilities(report)[(1, LesionClass.NORMAL)] == pytest.approx(0.91)


def test_multi_frame_sr_references_each_frame(tmp_path: Path):
    source, findings = scenario(MULTIFRAME_TRUE_COLOR_SC, frames=3)
    path, _ = write_image_sr(tmp_path, source, findings)
    assert_dciodvfy_clean(path)
    dsrdump(path)
    report = hd.sr.srread(path)
    got = probabilities(report)
    assert set(got) == {(frame, cls) for frame in (1, 2, 3) for cls in CLASS_ORDER}
    assert got[(2, LesionClass.NORMAL)] == pytest.approx(0.91)
    rois = report.content.get_planar_roi_measurement_groups()
    frames = [int(r._source_image_for_segmentation_item.ReferencedSOPSequence[0].ReferencedFrameNumber) for r in rois]
    assert frames == [1, 3]


def study_of(tmp_path: Path, *classes: LesionClass | None, model=TRAINED):
    study_uid = "1.2.826.0.1.3680043.8.498.777"
    members = []
    for index, cls in enumerate(classes):
        sop_class = VL_ENDOSCOPIC if index % 2 else SECONDARY_CAPTURE
        source, findings = scenario(sop_class, lesion=cls, model=model, study_uid=study_uid)
        members.append((source_header(source), findings))
    return members


def test_study_sr_concludes_by_priority_and_names_its_predecessor(tmp_path: Path):
    members = study_of(tmp_path, None, LesionClass.PU, LesionClass.SMT, None)
    conclusion = aggregate_study([f for _, fs in members for f in fs])
    study_uid = members[0][0].StudyInstanceUID
    previous = PredecessorRef(sop_instance_uid=study_sr_instance_uid(study_uid, TRAINED.weights_sha256, 1),
                              series_instance_uid=study_sr_series_uid(study_uid, TRAINED.weights_sha256))
    sr = build_study_sr(members, TRAINED, conclusion, revision=2, predecessor=previous)
    path = save(sr, tmp_path / "study.dcm")
    assert_dciodvfy_clean(path)
    assert "Conclusion" in dsrdump(path)

    report = hd.sr.srread(path)
    assert report.SOPInstanceUID == study_sr_instance_uid(members[0][0].StudyInstanceUID, TRAINED.weights_sha256, 2)
    assert report.SeriesInstanceUID == previous.series_instance_uid
    assert report.InstanceNumber == 2
    groups = report.content.get_image_measurement_groups()
    reported = [codes.class_from_code(g.finding_type) for g in groups if g.finding_type is not None]
    assert reported == [LesionClass.SMT, LesionClass.PU, LesionClass.NORMAL]
    (evaluation,) = groups[-1].get_qualitative_evaluations()
    assert evaluation.name == codes.CONCLUSION
    assert codes.class_from_code(evaluation.value) is LesionClass.SMT
    normal_group = groups[2]
    assert len(normal_group.source_images) == 2

    predecessor = report.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.SeriesInstanceUID == previous.series_instance_uid
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous.sop_instance_uid
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert sum(len(s.ReferencedSOPSequence) for s in evidence) == 4


def test_study_sr_rejects_mixed_studies_and_mismatched_conclusions(tmp_path: Path):
    members = study_of(tmp_path, LesionClass.PU, None)
    other, findings = scenario()
    conclusion = aggregate_study([f for _, fs in members for f in fs])
    with pytest.raises(OutputError, match="one study"):
        build_study_sr([*members, (source_header(other), findings)], TRAINED, conclusion)
    with pytest.raises(OutputError, match="conclusion covers"):
        build_study_sr(members[:1], TRAINED, conclusion)
