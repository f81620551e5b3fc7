"""Every coded concept GastroLens writes, in one place, each with where it comes from.

Standard codes come from DICOM PS3.16 (scheme ``DCM``), SNOMED CT (``SCT``) and UCUM.
Where SNOMED CT has no concept for one of the study's classes we use a local code in
the private scheme :data:`LOCAL_SCHEME` (PS3.3 8.1: private schemes start with "99").
Outputs that use local codes declare the scheme in the Coding Scheme Identification
Sequence (:func:`coding_scheme_identification`), so a reader can look it up.

Sources for the SNOMED CT disorder codes are not DICOM context groups; they are
recorded per code below (see also shared/dicom-notes.md, section 3).
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from gastrolens.findings import LesionClass

LOCAL_SCHEME = "99GASTROLENS"
"""Private coding scheme designator for concepts SNOMED CT does not have."""

LOCAL_SCHEME_NAME = "GastroLens local codes"
LOCAL_SCHEME_VERSION = "1"


def _local(value: str, meaning: str) -> CodedConcept:
    # No Coding Scheme Version on the items themselves: the version is declared once in
    # the Coding Scheme Identification Sequence, and highdicom's content-tree search
    # (find_content_items) ignores versions, so a versioned name would never match.
    return CodedConcept(value, LOCAL_SCHEME, meaning)


# --- anatomy, procedure, observer ----------------------------------------------------
STOMACH = CodedConcept("69695003", "SCT", "Stomach")
"""DICOM CID 4 / CID 4031 (pydicom codedict ``codes.SCT.Stomach``)."""

ESOPHAGOGASTRODUODENOSCOPY = CodedConcept("76009000", "SCT", "Esophagogastroduodenoscopy")
"""Procedure reported in the SR (SNOMED CT procedure; not in a DICOM CID)."""

DEVICE_OBSERVER = CodedConcept.from_code(codes.DCM.Device)
"""121007 DCM, CID 270 Observer Type."""

# --- SEG segment description ---------------------------------------------------------
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = CodedConcept.from_code(
    codes.SCT.MorphologicallyAbnormalStructure
)
"""49755003 SCT, CID 7150 Segmentation Property Categories."""

ARTIFICIAL_INTELLIGENCE = CodedConcept.from_code(codes.DCM.ArtificialIntelligence)
"""123110 DCM, CID 7162 Surface Processing Algorithm Families (used for AI models)."""

LESION = CodedConcept.from_code(codes.SCT.Lesion)
"""52988006 SCT, CID 7159 Lesion Segmentation Types. Segment type used when the
segmenter found a lesion but the classifier's top class is ``normal``."""

# --- SR measurements and evaluations -------------------------------------------------
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
"""122157 DCM. (111047 "Probability of cancer" is mammography CID 6048, not ours.)"""

NO_UNITS = CodedConcept("1", "UCUM", "no units")
"""UCUM unit "1" for dimensionless values (probabilities, fractions), CID 7181."""

LESION_AREA_FRACTION = _local("AREA-FRACTION", "Lesion area fraction")
"""Local: fraction of the image's pixels inside the lesion mask (0..1). Neither DICOM
nor SNOMED CT has a dimensionless "area fraction of image" measurement."""

CONCLUSION = CodedConcept.from_code(codes.DCM.Conclusion)
"""121077 DCM, CID 6053 / 7002."""

NORMALITY = CodedConcept.from_code(codes.DCM.Normality)
"""121402 DCM; values from CID 222 Normality Codes."""

ABNORMAL = CodedConcept.from_code(codes.SCT.Abnormal)
"""263654008 SCT, CID 222."""

COMMENT = CodedConcept.from_code(codes.DCM.Comment)
"""121106 DCM: used for the TEXT item carrying the untrained-model warning."""

QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 12 container. The code is the one DCMTK, dcmjs and the HL7
DICOM-SR-to-FHIR guide use for this container (PS3.16 TID 1500)."""

# --- the study's five classes ---------------------------------------------------------
_CLASS_CODES: dict[LesionClass, CodedConcept] = {
    # 17621005 SCT "Normal", DICOM CID 222 Normality Codes, with finding site Stomach.
    # SNOMED CT has no "normal gastric mucosa" concept.
    LesionClass.NORMAL: CodedConcept("17621005", "SCT", "Normal"),
    # 13200003 SCT "Peptic ulcer" (disorder), the study's class name. Cross-referenced by
    # HPO HP_0004398; 397825006 "Gastric ulcer" is the narrower alternative.
    LesionClass.PU: CodedConcept("13200003", "SCT", "Peptic ulcer"),
    # Local: SNOMED CT has no concept that joins early gastric cancer and high-grade
    # intraepithelial neoplasia; nearest parents are 363349007 "Malignant tumor of
    # stomach" and 128640002 "Glandular intraepithelial neoplasia, grade III".
    LesionClass.EGC_HGIN: _local(
        "EGC-HGIN", "Early gastric cancer or high-grade intraepithelial neoplasia"
    ),
    # Local: no SNOMED CT concept for "advanced" gastric cancer (invading beyond the
    # submucosa); parent 363349007 "Malignant tumor of stomach".
    LesionClass.AGC: _local("AGC", "Advanced gastric cancer"),
    # Local: no verified SNOMED CT concept for gastric submucosal tumour; the nearest,
    # 126824007 "Neoplasm of stomach", would also cover mucosal cancers.
    LesionClass.SMT: _local("SMT", "Gastric submucosal tumor"),
}


def class_code(cls: LesionClass) -> CodedConcept:
    """The coded concept for one of the study's classes (finding type, segment type)."""
    return _CLASS_CODES[cls]


def class_from_code(code: Dataset) -> LesionClass | None:
    """The class a code item stands for, or None when it is none of ours."""
    for cls, concept in _CLASS_CODES.items():
        if (code.CodeValue, code.CodingSchemeDesignator) == (
            concept.value,
            concept.scheme_designator,
        ):
            return cls
    return None


def coding_scheme_identification() -> list[Dataset]:
    """Items for Coding Scheme Identification Sequence (0008,0110) naming the local scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = LOCAL_SCHEME_NAME
    item.CodingSchemeVersion = LOCAL_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "GastroLens project"
    return [item]
