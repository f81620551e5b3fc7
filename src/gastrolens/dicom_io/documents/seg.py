"""The lesion mask as a DICOM Segmentation (highdicom, BINARY).

One segment per lesion finding: a single-frame source gets at most one segment, a
multi-frame source one segment per frame that shows a lesion with a non-empty mask, each stored in one SEG
frame that references its source frame. No SEG is made when no frame shows a lesion.

highdicom accepts only a single source frame when the source has no Frame of Reference
(VL Endoscopic never has one, Secondary Capture rarely), and it reads functional groups
from any instance of a multi-frame IOD. For multi-frame sources we therefore hand
highdicom a single-frame Secondary Capture stand-in for the source header, then put the
real SOP Class back into every reference and point each SEG frame's Derivation Image
Sequence at its own source frame (ReferencedFrameNumber, PS3.3 C.7.6.16.2.6).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from gastrolens.dicom_io.documents import codes
from gastrolens.dicom_io.documents.common import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    SOFTWARE_VERSION,
    check_lo,
    model_comment,
    references_frames,
    series_description,
)
from gastrolens.dicom_io.documents.read import number_of_frames
from gastrolens.dicom_io.documents.uids import derived_uid, instance_uid, series_uid
from gastrolens.errors import OutputError
from gastrolens.findings import ImageFinding, LesionClass, ModelIdentity, OutputKind

logger = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9701
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_MULTIFRAME_ONLY = (
    "NumberOfFrames",
    "FrameIncrementPointer",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
)


@dataclass(frozen=True)
class SegmentInfo:
    """Where one lesion finding lives in the SEG, for the SR to reference it."""

    source_frame: int
    """1-based frame number in the source instance."""
    segment_number: int
    seg_frame_number: int
    """1-based frame number in the SEG that holds this segment's mask."""
    tracking_uid: UID
    lesion_class: LesionClass | None
    """The predicted class, or None when the classifier said normal (generic lesion)."""


def segment_tracking_uid(source_uid: str, weights_sha256: str, source_frame: int) -> UID:
    """Tracking UID shared by a SEG segment and the SR group that describes it."""
    return derived_uid("segment-tracking", source_uid, weights_sha256, str(source_frame))


def algorithm_identification(model: ModelIdentity) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=check_lo(model.name, "model name"),
        version=check_lo(model.version, "model version"),
        family=codes.ARTIFICIAL_INTELLIGENCE,
        source=MANUFACTURER,
        parameters={"weights_sha256": model.weights_sha256, "untrained": str(model.untrained).lower()},
    )


def lesion_frames(findings: Sequence[ImageFinding]) -> list[int]:
    """1-based numbers of the frames with a lesion and a non-empty mask.

    A frame the classifier calls a lesion but whose mask is empty gets no segment (an
    empty segment shows nothing); the SR still reports its finding.
    """
    return [
        number
        for number, finding in enumerate(findings, start=1)
        if finding.lesion_present and bool(finding.mask.any())
    ]


def build_segmentation(
    header: Dataset, findings: Sequence[ImageFinding], model: ModelIdentity
) -> tuple[hd.seg.Segmentation, list[SegmentInfo]] | None:
    """The SEG for one source instance, or None when no frame shows a lesion.

    ``header`` is the source without pixel data (:func:`common.source_header`);
    ``findings`` were checked against it (:func:`common.check_findings`).
    """
    frames = lesion_frames(findings)
    if not frames:
        return None
    source_uid = header.SOPInstanceUID
    multiframe = number_of_frames(header) > 1 or "NumberOfFrames" in header
    algorithm = algorithm_identification(model)

    descriptions = []
    infos = []
    for segment_number, frame in enumerate(frames, start=1):
        finding = findings[frame - 1]
        lesion_class = finding.predicted if finding.predicted.is_lesion else None
        label = lesion_class.display_name if lesion_class else "lesion"
        if multiframe:
            label = f"{label} (frame {frame})"
        tracking = segment_tracking_uid(source_uid, model.weights_sha256, frame)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=segment_number,
                segment_label=label,
                segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                segmented_property_type=codes.class_code(lesion_class) if lesion_class else codes.LESION,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=tracking,
                tracking_id=f"frame {frame} lesion",
                anatomic_regions=[codes.STOMACH],
            )
        )
        infos.append(
            SegmentInfo(
                source_frame=frame,
                segment_number=segment_number,
                seg_frame_number=segment_number,
                tracking_uid=tracking,
                lesion_class=lesion_class,
            )
        )

    masks = np.stack([findings[frame - 1].mask for frame in frames], axis=-1)[np.newaxis]
    proxy = _single_frame_proxy(header) if multiframe else header
    try:
        seg = hd.seg.Segmentation(
            source_images=[proxy],
            pixel_array=masks.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid(OutputKind.SEG, header.StudyInstanceUID, model.weights_sha256),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=instance_uid(OutputKind.SEG, source_uid, model.weights_sha256),
            instance_number=int(header.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            manufacturer_model_name=check_lo(model.name, "model name"),
            software_versions=[SOFTWARE_VERSION, model.version],  # type: ignore[arg-type]  # VM 1-n
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_description=check_lo(f"{model.name} {model.version} lesion mask"[:64], "content description"),
            content_label="GASTROLENS",
            omit_empty_frames=False,
            series_description=series_description("SEG", model),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"source instance {source_uid}: highdicom refused the SEG: {exc}") from exc

    # dciodvfy asks for PatientOrientation (General Image, Type 2C); highdicom omits it.
    seg.PatientOrientation = header.get("PatientOrientation", "")
    seg.ImageComments = model_comment(model)
    seg.CodingSchemeIdentificationSequence = codes.coding_scheme_identification()
    _fix_dimension_organization_uid(seg, dimension_organization_uid(source_uid, model.weights_sha256))
    _null_padding(seg, (len(frames) * masks.shape[1] * masks.shape[2] + 7) // 8)
    if multiframe:
        _restore_source_class(seg, source_uid, header.SOPClassUID)
        if references_frames(header):
            _reference_source_frames(seg, infos)
    return seg, infos


def dimension_organization_uid(source_uid: str, weights_sha256: str) -> UID:
    """highdicom draws a random Dimension Organization UID; ours is derived like every
    other UID, so the same image and weights give the same SEG."""
    return derived_uid("dimension-organization", source_uid, weights_sha256)


def _fix_dimension_organization_uid(seg: Dataset, uid: UID) -> None:
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(keyword, []):
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = uid


def _null_padding(seg: Dataset, packed_length: int) -> None:
    """highdicom pads odd-length packed bits with the character '0' (0x30); PS3.5 8.1.1
    asks for a NULL byte. The pad is not a pixel, but readers and checksums see it."""
    data = seg.PixelData
    if packed_length % 2 and len(data) == packed_length + 1 and data[-1:] == b"0":
        seg.PixelData = data[:-1] + b"\x00"


def _single_frame_proxy(header: Dataset) -> Dataset:
    proxy = copy.deepcopy(header)  # elements must not be shared: we change SOPClassUID
    for keyword in _MULTIFRAME_ONLY:
        if keyword in proxy:
            del proxy[keyword]
    proxy.SOPClassUID = SECONDARY_CAPTURE
    return proxy


def _restore_source_class(ds: Dataset, source_uid: str, sop_class_uid: str) -> None:
    """Every reference to the source names its real SOP Class, not the stand-in's."""
    for elem in ds:
        if elem.VR != "SQ":
            continue
        for item in elem.value:
            if item.get("ReferencedSOPInstanceUID") == source_uid and "ReferencedSOPClassUID" in item:
                item.ReferencedSOPClassUID = sop_class_uid
            _restore_source_class(item, source_uid, sop_class_uid)


def _reference_source_frames(seg: hd.seg.Segmentation, infos: Sequence[SegmentInfo]) -> None:
    """Point each SEG frame's Derivation Image Sequence at its own source frame."""
    if len(infos) == 1 and "DerivationImageSequence" in seg.SharedFunctionalGroupsSequence[0]:
        groups = [(seg.SharedFunctionalGroupsSequence[0], infos[0])]
    else:
        groups = [(seg.PerFrameFunctionalGroupsSequence[i.seg_frame_number - 1], i) for i in infos]
    for group, info in groups:
        if "DerivationImageSequence" not in group:
            raise OutputError("highdicom wrote no Derivation Image Sequence for a SEG frame")
        # highdicom shares one item between all frames; each frame needs its own.
        group.DerivationImageSequence = copy.deepcopy(group.DerivationImageSequence)
        for derivation in group.DerivationImageSequence:
            for source_image in derivation.SourceImageSequence:
                source_image.ReferencedFrameNumber = info.source_frame
