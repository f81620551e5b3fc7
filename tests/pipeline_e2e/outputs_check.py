"""Check what a destination received against the daemon's database: every output, parsed back.

Used by the Orthanc and the DCMTK round trips: the same expectations whoever the peer is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset

from gastrolens import UNTRAINED_WARNING
from gastrolens.dicom_io.documents import codes
from gastrolens.findings import LesionClass
from gastrolens.models.conclusion import aggregate_study
from pipeline_e2e.peers import DatabaseView, SyntheticStudy

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Received:
    """What the destination holds for one study, split by kind."""

    segs: dict[str, hd.seg.Segmentation]
    """Source SOP Instance UID -> SEG."""
    image_srs: dict[str, hd.sr.ComprehensiveSR]
    """Source SOP Instance UID -> per-image SR."""
    overlays: dict[str, Dataset]
    """Source SOP Instance UID -> overlay."""
    study_srs: list[hd.sr.ComprehensiveSR]
    """Study SRs, by revision."""


def _evidence_uids(sr: Dataset) -> set[str]:
    return {ref.ReferencedSOPInstanceUID for item in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def _is_study_sr(sr: hd.sr.ComprehensiveSR) -> bool:
    return any(g.tracking_identifier == "study conclusion" for g in sr.content.get_image_measurement_groups())


def classify(blobs: Iterable[bytes], study: SyntheticStudy) -> Received:
    """Parse every received object of ``study`` (sources excluded) and file it by kind and source."""
    sources = set(study.sop_uids)
    received = Received({}, {}, {}, [])
    for blob in blobs:
        ds = pydicom.dcmread(BytesIO(blob))
        assert ds.StudyInstanceUID == study.study_uid, "an output landed outside the source study"
        if ds.SOPInstanceUID in sources:
            continue
        if ds.SOPClassUID == SEG:
            seg = hd.seg.segread(BytesIO(blob))
            (source,) = {ref.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                         for ref in series.ReferencedInstanceSequence}
            assert source not in received.segs, f"two SEGs for source {source}"
            received.segs[source] = seg
        elif ds.SOPClassUID == COMPREHENSIVE_SR:
            sr = hd.sr.srread(BytesIO(blob))
            if _is_study_sr(sr):
                received.study_srs.append(sr)
                continue
            (source,) = _evidence_uids(sr) & sources
            assert source not in received.image_srs, f"two SRs for source {source}"
            received.image_srs[source] = sr
        elif ds.SOPClassUID == SECONDARY_CAPTURE and "DERIVED" in ds.ImageType:
            (source,) = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
            assert source not in received.overlays, f"two overlays for source {source}"
            received.overlays[source] = ds
        else:
            raise AssertionError(f"unexpected object {ds.SOPClassUID} {ds.SOPInstanceUID}")
    received.study_srs.sort(key=lambda sr: int(sr.InstanceNumber))
    return received


def check_outputs(blobs: Iterable[bytes], study: SyntheticStudy, view: DatabaseView) -> Received:
    """Everything GastroLens recorded for ``study`` arrived, parses and references the right sources."""
    received = classify(blobs, study)
    findings = view.findings_by_sop()
    assert set(findings) >= set(study.sop_uids), "an instance of the study has no results"
    # A SEG holds a segment for each frame with a lesion and a non-empty mask (dicom_io.seg.lesion_frames).
    with_lesion = {uid for uid in study.sop_uids
                   if any(f.lesion_present and f.lesion_area_fraction > 0 for f in findings[uid])}
    recorded = Counter(o.kind.value for o in view.outputs())

    # One SEG per image with a lesion, one SR and one overlay per image, at least one study SR.
    assert set(received.segs) == with_lesion, (sorted(received.segs), sorted(with_lesion))
    assert set(received.image_srs) == set(study.sop_uids)
    assert set(received.overlays) == set(study.sop_uids)
    assert received.study_srs, "no study SR arrived"
    assert recorded["seg"] == len(with_lesion)
    assert recorded["sr"] == recorded["overlay"] == len(study.sop_uids)
    assert recorded["study_sr"] == len(received.study_srs)

    sources = {uid: pydicom.dcmread(path, stop_before_pixels=True)
               for uid, path in zip(study.sop_uids, study.files, strict=True)}
    for uid, seg in received.segs.items():
        frames = {ref.ReferencedSOPInstanceUID for item in seg.PerFrameFunctionalGroupsSequence
                  for derivation in item.DerivationImageSequence for ref in derivation.SourceImageSequence}
        assert frames == {uid}
        assert seg.PatientID == sources[uid].PatientID
        assert UNTRAINED_WARNING in seg.SeriesDescription
    for uid, sr in received.image_srs.items():
        (finding,) = findings[uid]
        groups = sr.content.get_image_measurement_groups()
        referenced = {g.source_images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for g in groups}
        assert referenced == {uid}
        main = next(g for g in groups if g.tracking_identifier == "frame 1 finding")
        assert codes.class_from_code(main.finding_type) is finding.predicted
        (probability,) = main.get_measurements(name=codes.PROBABILITY)
        assert abs(probability.value - finding.probability(finding.predicted)) < 1e-6
        rois = sr.content.get_planar_roi_measurement_groups()
        if uid in with_lesion:
            (roi,) = rois
            ref = roi.referenced_segmentation_frame[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == received.segs[uid].SOPInstanceUID
        else:
            assert rois == []
    for uid, overlay in received.overlays.items():
        source = sources[uid]
        assert overlay.pixel_array.shape == (source.Rows, source.Columns, 3)
        assert overlay.SeriesInstanceUID != source.SeriesInstanceUID

    # The latest study SR covers every image and concludes by the same rule, from the database's results.
    latest = received.study_srs[-1]
    assert _evidence_uids(latest) == set(study.sop_uids)
    expected = aggregate_study([f for uid in study.sop_uids for f in findings[uid]])
    (conclusion_group,) = [g for g in latest.content.get_image_measurement_groups()
                           if g.tracking_identifier == "study conclusion"]
    (evaluation,) = conclusion_group.get_qualitative_evaluations()
    assert codes.class_from_code(evaluation.value) is expected.conclusion
    reported = [codes.class_from_code(g.finding_type) for g in latest.content.get_image_measurement_groups()
                if g.tracking_identifier != "study conclusion"]
    assert reported == list(expected.reported_classes)
    assert isinstance(expected.conclusion, LesionClass)
    for earlier, later in zip(received.study_srs, received.study_srs[1:], strict=False):  # consecutive pairs
        predecessor = later.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    return received
