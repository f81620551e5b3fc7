"""Structured Reports (Comprehensive SR, TID 1500 Measurement Report), built with highdicom.

Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) because the content needs IMAGE
references and NUM items but no 3-D coordinates, and more PACS accept it than
Comprehensive 3D SR (shared/dicom-notes.md, section 3).

Per source instance (``OutputKind.SR``), for every frame:

- a TID 1501 group "frame N finding": Finding = the predicted class, Finding Site =
  stomach, Probability of that class and the lesion area fraction, the source frame;
- a TID 1501 group "frame N alternative class" for each other class with its Probability;
- when the SEG has a segment for the frame, a TID 1410 group referencing that segment
  (its tracking UID is the segment's Tracking UID).

Per study (``OutputKind.STUDY_SR``, built in :mod:`study_sr`): one TID 1501 group per reported class (the images
that show it and its highest probability) and an image-less "study conclusion" group
whose Conclusion names the class chosen by :func:`conclusion.aggregate_study`.
A revision names its predecessor in Predecessor Documents Sequence.

Both carry the model in TID 4019 Algorithm Identification (name, version, and the
weights sha256 as an Algorithm Parameter) and in the device observer context; an
untrained model adds the warning as a TEXT item in a TID 1500 "Qualitative
Evaluations" container and in the Series Description.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset

from gastrolens import UNTRAINED_WARNING
from gastrolens.dicom_io.documents import codes
from gastrolens.dicom_io.documents.common import (
    MANUFACTURER,
    check_lo,
    model_label,
    now,
    references_frames,
    series_description,
)
from gastrolens.dicom_io.documents.read import number_of_frames
from gastrolens.dicom_io.documents.seg import SegmentInfo
from gastrolens.dicom_io.documents.uids import (
    derived_uid,
    instance_uid,
    series_uid,
)
from gastrolens.errors import OutputError
from gastrolens.findings import CLASS_ORDER, ImageFinding, ModelIdentity, OutputKind

logger = logging.getLogger(__name__)

Group = hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
"""A TID 1501 or TID 1410 measurement group."""

SR_SERIES_NUMBER = 9702
STUDY_SR_SERIES_NUMBER = 9704
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class PredecessorRef:
    """The earlier study SR that a new revision replaces."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str = COMPREHENSIVE_SR


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    parameters = [f"weights_sha256={model.weights_sha256}"]
    if model.untrained:
        parameters.append("untrained=true")
    return hd.sr.AlgorithmIdentification(
        name=check_lo(model.name, "model name"),
        version=check_lo(model.version, "model version"),
        parameters=parameters,
    )


def _observation_context(model: ModelIdentity) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device-observer", model.weights_sha256),
        name="GastroLens",
        manufacturer_name=MANUFACTURER,
        model_name=check_lo(model_label(model), "model name and version"),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE_OBSERVER,
            observer_identifying_attributes=device,
        )
    )


def _probability(value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=codes.PROBABILITY, value=float(value), unit=codes.NO_UNITS)


def _frames(header: Dataset, frame: int) -> list[int] | None:
    """Referenced frame numbers: only for multi-frame sources (PS3.3 Table 10-3)."""
    return [frame] if references_frames(header) else None


def _measured_in(header: Dataset, frame: int) -> hd.sr.SourceImageForMeasurementGroup:
    """The source (frame) of a measurement group.

    Built from its UIDs rather than ``from_source_image``, which reads multi-frame-ness
    from the instance; :func:`common.references_frames` decides instead (a Secondary
    Capture with NumberOfFrames 2 is referenced as a whole).
    """
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID,
        referenced_frame_numbers=_frames(header, frame),
    )


def _segmented_in(header: Dataset, frame: int) -> hd.sr.SourceImageForSegmentation:
    """The source (frame) a segment was made from (see :func:`_measured_in`)."""
    return hd.sr.SourceImageForSegmentation(
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID,
        referenced_frame_numbers=_frames(header, frame),
    )


def _image_groups(
    header: Dataset,
    findings: Sequence[ImageFinding],
    model: ModelIdentity,
    seg: hd.seg.Segmentation | None,
    segments: Sequence[SegmentInfo],
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    uid = header.SOPInstanceUID
    sha = model.weights_sha256
    algorithm = _algorithm(model)
    site = hd.sr.FindingSite(anatomic_location=codes.STOMACH)
    by_frame = {info.source_frame: info for info in segments}
    groups: list[Group] = []
    for frame, finding in enumerate(findings, start=1):
        source = _measured_in(header, frame)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid("sr-finding", uid, sha, str(frame)), identifier=f"frame {frame} finding"
                ),
                finding_type=codes.class_code(finding.predicted),
                finding_sites=[site],
                algorithm_id=algorithm,
                measurements=[
                    _probability(finding.probability(finding.predicted)),
                    hd.sr.Measurement(
                        name=codes.LESION_AREA_FRACTION,
                        value=float(finding.lesion_area_fraction),
                        unit=codes.NO_UNITS,
                    ),
                ],
                source_images=[source],
            )
        )
        for cls in CLASS_ORDER:
            if cls is finding.predicted:
                continue
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=derived_uid("sr-class", uid, sha, str(frame), cls.value),
                        identifier=f"frame {frame} alternative class",
                    ),
                    finding_type=codes.class_code(cls),
                    finding_sites=[site],
                    algorithm_id=algorithm,
                    measurements=[_probability(finding.probability(cls))],
                    source_images=[_measured_in(header, frame)],
                )
            )
        info = by_frame.get(frame)
        if info is not None and seg is not None:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=info.tracking_uid, identifier=f"frame {frame} lesion"
                    ),
                    referenced_segment=hd.sr.ReferencedSegmentationFrame(
                        sop_class_uid=seg.SOPClassUID,
                        sop_instance_uid=seg.SOPInstanceUID,
                        frame_number=info.seg_frame_number,
                        segment_number=info.segment_number,
                        source_image=_segmented_in(header, frame),
                    ),
                    finding_type=codes.class_code(info.lesion_class) if info.lesion_class else codes.LESION,
                    finding_sites=[site],
                    algorithm_id=algorithm,
                    measurements=[
                        _probability(finding.probability(finding.predicted)),
                        hd.sr.Measurement(
                            name=codes.LESION_AREA_FRACTION,
                            value=float(finding.lesion_area_fraction),
                            unit=codes.NO_UNITS,
                        ),
                    ],
                )
            )
    return groups


def _report(
    model: ModelIdentity,
    groups: Sequence[Group],
    referenced_images: Sequence[Dataset],
) -> hd.sr.MeasurementReport:
    """TID 1500 around ``groups``; ``model`` is the observer (for a study judged by several
    models, :mod:`study_sr` passes one identity that names them all)."""
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=codes.ESOPHAGOGASTRODUODENOSCOPY,
        imaging_measurements=list(groups),
        referenced_images=list(referenced_images),
    )
    if model.untrained:
        # TID 1500 row 12: a "Qualitative Evaluations" container of CODE or TEXT items.
        container = hd.sr.ContainerContentItem(
            name=codes.QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        container.ContentSequence = [  # type: ignore[assignment]  # pydicom accepts a list
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=UNTRAINED_WARNING,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
        report[0].ContentSequence.append(container)
    return report


def _finish(sr: hd.sr.ComprehensiveSR) -> hd.sr.ComprehensiveSR:
    _drop_segment_number_beside_frame_number(sr)
    sr.CodingSchemeIdentificationSequence = codes.coding_scheme_identification()
    return sr


def _drop_segment_number_beside_frame_number(ds: Dataset) -> None:
    """highdicom writes both numbers in a Referenced Segmentation Frame IMAGE item.

    PS3.3 Table 10-3 makes each required only when the other is absent; dciodvfy and
    dsrdump both flag the pair. The frame number identifies the segment uniquely (one
    segment per SEG frame), so the segment number goes.
    """
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in ref and "ReferencedSegmentNumber" in ref:
                del ref.ReferencedSegmentNumber
        _drop_segment_number_beside_frame_number(item)


def build_image_sr(
    header: Dataset,
    findings: Sequence[ImageFinding],
    model: ModelIdentity,
    seg: hd.seg.Segmentation | None = None,
    segments: Sequence[SegmentInfo] = (),
) -> hd.sr.ComprehensiveSR:
    """The per-instance SR: every frame's finding, class probabilities and segment."""
    if number_of_frames(header) != len(findings):
        raise OutputError(f"source instance {header.SOPInstanceUID}: findings do not match its frames")
    groups = _image_groups(header, findings, model, seg, segments)
    evidence = [header] if seg is None else [header, seg]
    created = now()
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=evidence,
            content=_report(model, groups, [header]),
            series_instance_uid=series_uid(OutputKind.SR, header.StudyInstanceUID, model.weights_sha256),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=instance_uid(OutputKind.SR, header.SOPInstanceUID, model.weights_sha256),
            instance_number=int(header.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=series_description("SR", model),
            content_date=created.date(),
            content_time=created.time(),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"source instance {header.SOPInstanceUID}: highdicom refused the SR: {exc}") from exc
    return _finish(sr)
