"""Reading a study SR back (:mod:`study_sr` wrote it) into what a result message needs.

A report to a system that speaks no DICOM (HL7 v2, :mod:`gastrolens.hl7v2`) is built
from the study SR file itself, not from the database: the SR is the conclusion of
record, it carries the patient and order attributes copied from the sources (name in its
Specific Character Set, ID with issuer, accession number), each reported class with its
code and highest probability, every model with its weights hash, the UNTRAINED warning,
and whether it revises an earlier SR (Predecessor Documents Sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from gastrolens.dicom_io.documents import codes
from gastrolens.errors import OutputError
from gastrolens.findings import ModelIdentity

IMAGING_MEASUREMENTS = ("126010", "DCM")
MEASUREMENT_GROUP = ("125007", "DCM")
FINDING = ("121071", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
ALGORITHM_PARAMETERS = ("111002", "DCM")


@dataclass(frozen=True)
class Coded:
    """A coded concept as (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ReportedClass:
    finding: Coded
    probability: float
    """The highest probability of this class among the images predicted as it."""


@dataclass(frozen=True, kw_only=True)
class StudyReportContent:
    """What a study SR says, detached from DICOM."""

    sop_instance_uid: str
    study_instance_uid: str
    patient_name: str
    """The DICOM PN value, decoded (``family^given=ideographic=phonetic``); empty when unknown."""
    patient_id: str
    issuer_of_patient_id: str
    birth_date: str
    sex: str
    accession_number: str
    study_date: str
    content_datetime: str
    """YYYYMMDDHHMMSS of the SR's content (when the conclusion was written)."""
    revision: int
    corrects: bool
    """True when the SR names a predecessor: it replaces an earlier conclusion."""
    conclusion: Coded
    classes: tuple[ReportedClass, ...]
    """Each reported class once, in the SR's (priority) order."""
    models: tuple[ModelIdentity, ...]
    untrained_warning: str | None


def _code(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    seq = item.get(attribute)
    if not seq:
        return ("", "")
    return (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", "")))


def _coded(item: Dataset) -> Coded:
    code = item.ConceptCodeSequence[0]
    return Coded(str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.get("CodeMeaning", "")))


def read_study_report(path: Path) -> StudyReportContent:
    """The content of the study SR at ``path``; OutputError when it is not one GastroLens wrote."""
    try:
        sr = dcmread(path)
    except (InvalidDicomError, ValueError) as exc:
        raise OutputError(f"{path} is not a readable DICOM file: {exc}") from exc
    return study_report_content(sr)


def study_report_content(sr: Dataset) -> StudyReportContent:
    groups = [
        group
        for container in sr.get("ContentSequence", [])
        if _code(container) == IMAGING_MEASUREMENTS
        for group in container.get("ContentSequence", [])
        if _code(group) == MEASUREMENT_GROUP
    ]
    conclusion: Coded | None = None
    best: dict[Coded, float] = {}
    models: dict[ModelIdentity, None] = {}
    for group in groups:
        items = list(group.get("ContentSequence", []))
        finding = next((_coded(i) for i in items if _code(i) == FINDING), None)
        found = next((_coded(i) for i in items if _code(i) == (codes.CONCLUSION.value, "DCM")), None)
        if found is not None:
            conclusion = found
        if finding is None:
            continue
        probabilities = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                         if _code(i) == (codes.PROBABILITY.value, "DCM") and i.get("MeasuredValueSequence")]
        if probabilities:
            best[finding] = max(best.get(finding, 0.0), *probabilities)
        model = _model(items)
        if model is not None:
            models.setdefault(model)
    if conclusion is None:
        raise OutputError(f"SR {sr.get('SOPInstanceUID', '?')} has no study conclusion: not a study SR")
    warning = next((str(item.TextValue) for container in sr.get("ContentSequence", [])
                    if _code(container) == (codes.QUALITATIVE_EVALUATIONS.value, "UMLS")
                    for item in container.get("ContentSequence", [])
                    if _code(item) == (codes.COMMENT.value, "DCM") and "TextValue" in item), None)
    return StudyReportContent(
        sop_instance_uid=str(sr.SOPInstanceUID),
        study_instance_uid=str(sr.StudyInstanceUID),
        patient_name=str(sr.get("PatientName", "") or ""),
        patient_id=str(sr.get("PatientID", "") or ""),
        issuer_of_patient_id=str(sr.get("IssuerOfPatientID", "") or ""),
        birth_date=str(sr.get("PatientBirthDate", "") or ""),
        sex=str(sr.get("PatientSex", "") or ""),
        accession_number=str(sr.get("AccessionNumber", "") or ""),
        study_date=str(sr.get("StudyDate", "") or ""),
        content_datetime=f"{sr.get('ContentDate', '')}{str(sr.get('ContentTime', '')).split('.')[0]}",
        revision=int(sr.get("InstanceNumber", 1) or 1),
        corrects=bool(sr.get("PredecessorDocumentsSequence")),
        conclusion=conclusion,
        classes=tuple(ReportedClass(finding, probability) for finding, probability in best.items()),
        models=tuple(models),
        untrained_warning=warning,
    )


def _model(items: list[Dataset]) -> ModelIdentity | None:
    """The TID 4019 algorithm of a class group (name, version, ``weights_sha256=`` and ``untrained=true``)."""
    name = next((str(i.TextValue) for i in items if _code(i) == ALGORITHM_NAME), None)
    if name is None:
        return None
    version = next((str(i.TextValue) for i in items if _code(i) == ALGORITHM_VERSION), "")
    parameters = [str(i.TextValue) for i in items if _code(i) == ALGORITHM_PARAMETERS]
    sha = next((p.split("=", 1)[1] for p in parameters if p.startswith("weights_sha256=")), "")
    return ModelIdentity(name=name, version=version, weights_sha256=sha, untrained="untrained=true" in parameters)
