"""What every GastroLens output shares: checked inputs, the source header, the model's
identity in words, equipment attributes, and saving a dataset atomically."""

from __future__ import annotations

import copy
import datetime
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from gastrolens import UNTRAINED_WARNING, __version__
from gastrolens.dicom_io.documents.read import has_pixel_data, number_of_frames
from gastrolens.errors import DecodeError, OutputError
from gastrolens.findings import CLASS_ORDER, ImageFinding, ModelIdentity
from gastrolens.storage.atomic import write_atomic

logger = logging.getLogger(__name__)

MANUFACTURER = "GastroLens"
SOFTWARE_VERSION = __version__
DEVICE_SERIAL_NUMBER = "GASTROLENS"
INSTITUTION_DEPARTMENT = "Endoscopy"

# Patient (C.7.1.1), General Study (C.7.2.1) and Patient Study (C.7.2.2) attributes
# copied into every output; Type 2 ones are written empty when the source lacks them.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthTime",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroupCodeSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ReferencedStudySequence",
    "RequestingService",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
)

_LOSSLESS_SYNTAXES = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
}


SINGLE_FRAME_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.77.1.1"})
"""Secondary Capture and VL Endoscopic Image: IODs without a Multi-frame module."""


def references_frames(header: Dataset) -> bool:
    """Whether references to ``header`` name frames (Referenced Frame Number).

    Only for instances of multi-frame IODs: for a Secondary Capture or VL Endoscopic
    instance that carries several frames anyway, dciodvfy rejects frame numbers (the
    referenced class "is not multi-frame"), so the instance is referenced as a whole and
    the frame is named in the labels and tracking identifiers.
    """
    return "NumberOfFrames" in header and str(header.get("SOPClassUID", "")) not in SINGLE_FRAME_CLASSES


def check_source(source: Dataset) -> None:
    """Raise OutputError unless ``source`` is an image we can derive outputs from."""
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        if not source.get(keyword):
            raise OutputError(f"source instance {source.get('SOPInstanceUID', '?')} lacks {keyword}")
    if not has_pixel_data(source):
        raise OutputError(f"source instance {source.SOPInstanceUID} has no pixel data")


def check_findings(source: Dataset, findings: Sequence[ImageFinding]) -> ModelIdentity:
    """Check one finding per frame, masks of the frame size, one model; return the model."""
    uid = source.SOPInstanceUID
    try:
        frames = number_of_frames(source)
    except DecodeError as exc:
        raise OutputError(f"source instance {uid}: {exc}") from exc
    if len(findings) != frames:
        raise OutputError(f"source instance {uid} has {frames} frame(s) but {len(findings)} finding(s) were given")
    shape = (int(source.Rows), int(source.Columns))
    models = {f.model for f in findings}
    if len(models) != 1:
        raise OutputError(f"source instance {uid}: findings come from {len(models)} different models")
    for number, finding in enumerate(findings, start=1):
        where = f"source instance {uid} frame {number}"
        mask = finding.mask
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            got = f"{mask.dtype} array" if isinstance(mask, np.ndarray) else type(mask).__name__
            raise OutputError(f"{where}: mask must be a boolean numpy array, got {got}")
        if mask.shape != shape:
            raise OutputError(f"{where}: mask shape {mask.shape} does not match the frame size {shape}")
        if len(finding.probabilities) != len(CLASS_ORDER):
            raise OutputError(f"{where}: {len(finding.probabilities)} probabilities for {len(CLASS_ORDER)} classes")
        for p in (*finding.probabilities, finding.lesion_area_fraction):
            if not (isinstance(p, (int, float, np.floating)) and math.isfinite(p) and 0.0 <= p <= 1.0):
                raise OutputError(f"{where}: probability or area fraction {p!r} is not in [0, 1]")
    return models.pop()


def source_header(source: Dataset) -> Dataset:
    """A copy of ``source`` without pixel data, with Type 2 patient/study attributes present.

    highdicom reads ``PatientName`` etc. as attributes, so a source without them (they are
    Type 2, a PACS may leave them out) would fail there; empty values are what the
    standard asks for when the value is unknown.
    """
    header = Dataset()
    for elem in source:
        if elem.keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            continue
        header.add(copy.deepcopy(elem))
    if hasattr(source, "file_meta"):
        header.file_meta = copy.deepcopy(source.file_meta)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient, General Study and Patient Study attributes (and the charset)."""
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    target.StudyInstanceUID = source.StudyInstanceUID
    for keyword in PATIENT_STUDY_TYPE2:
        setattr(target, keyword, copy.deepcopy(source.get(keyword)))
    for keyword in PATIENT_STUDY_OPTIONAL:
        if keyword in source:
            setattr(target, keyword, copy.deepcopy(source[keyword].value))


def source_was_lossy(source: Dataset) -> bool:
    """True when the source's pixels went through lossy compression at some point."""
    if str(source.get("LossyImageCompression", "")) == "01":
        return True
    ts = getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", None)
    return ts is not None and UID(ts) not in _LOSSLESS_SYNTAXES


def model_label(model: ModelIdentity) -> str:
    """'<name> <version>' as written in series descriptions and on the overlay."""
    return f"{model.name} {model.version}"


def series_description(kind_label: str, model: ModelIdentity) -> str:
    """SeriesDescription (LO, 64 characters): the warning first when untrained, then
    'GastroLens <kind>', then the model's name and version when they still fit."""
    parts = [f"GastroLens {kind_label}", model_label(model)]
    if model.untrained:
        parts.insert(0, UNTRAINED_WARNING)
    text = parts[0]
    for part in parts[1:]:
        if len(text) + 1 + len(part) > 64:
            break
        text = f"{text} {part}"
    return text


def model_comment(model: ModelIdentity) -> str:
    """One line naming the model with its weights hash, plus the warning if untrained."""
    text = f"model {model.name} version {model.version} weights sha256 {model.weights_sha256}"
    if model.untrained:
        text = f"{UNTRAINED_WARNING}; {text}"
    return text


def check_lo(value: str, what: str) -> str:
    """Reject a value that does not fit VR LO (64 characters, no backslash)."""
    if len(value) > 64 or "\\" in value:
        raise OutputError(f"{what} {value!r} does not fit a DICOM LO value (64 characters, no backslash)")
    return value


def now() -> datetime.datetime:
    return datetime.datetime.now().replace(microsecond=0)


def save(ds: Dataset, path: Path, *, fsync: bool = True) -> Path:
    """Write ``ds`` as a DICOM file atomically to ``path``: Explicit VR Little Endian,
    unless its pixel data is encapsulated (a JPEG overlay), which keeps its syntax."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None or not UID(syntax).is_compressed:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        write_atomic(path, lambda fh: ds.save_as(fh, enforce_file_format=True), fsync=fsync)
    except (OSError, ValueError, TypeError) as exc:
        raise OutputError(f"could not write {path}: {exc}") from exc
    logger.debug("wrote %s (%s)", path, ds.SOPInstanceUID)
    return path
