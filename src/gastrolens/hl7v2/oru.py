"""The study conclusion as an HL7 v2.5.1 ORU^R01, built with hl7apy (strict structure validation).

One message per study SR revision::

    MSH  ORU^R01^ORU_R01, version 2.5.1, MSH-18 the destination's character set
    PID  PID-3 Patient ID ^^^ issuer (MR); PID-5 the name, one repetition per DICOM PN
         group (alphabetic A, ideographic I, phonetic P in XPN-8); birth date, sex
    ORC  RE, placer and filler order number = accession number
    OBR  placer and filler order number = accession number (filler: the Study Instance
         UID when there is none), 76009000^Esophagogastroduodenoscopy^SCT, result
         status F, or C when the SR revises an earlier one
    OBX  CWE 121077^Conclusion^DCM = the concluded class
    OBX  NM  one per reported class: OBX-3 the class's code, OBX-5 its highest
         probability (unit 1, UCUM; OBX-17 122157^Probability^DCM), OBX-8 N or A
    OBX  ST  111001^Algorithm Name^DCM: each model, its version and weights sha256
    OBX  ST  121106^Comment^DCM: the UNTRAINED warning, when it applies

Codes are those of the study SR (SCT, DCM, the local 99GASTROLENS scheme), so the HL7
result and the DICOM one say the same thing in the same terms. Every value goes through
hl7apy's data types, which escape HL7 delimiters (``^`` in an ID becomes ``\\S\\``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from hl7apy import v2_5_1
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Element, Field, Message, Segment
from hl7apy.exceptions import HL7apyException

from gastrolens.config.schema import HL7
from gastrolens.dicom_io.documents import codes
from gastrolens.dicom_io.documents.study_sr_read import Coded, StudyReportContent
from gastrolens.errors import OutputError
from gastrolens.findings import LesionClass

VERSION = "2.5.1"
PROCEDURE = Coded(codes.ESOPHAGOGASTRODUODENOSCOPY.value, "SCT", codes.ESOPHAGOGASTRODUODENOSCOPY.meaning)
CONCLUSION = Coded(codes.CONCLUSION.value, "DCM", codes.CONCLUSION.meaning)
PROBABILITY = Coded(codes.PROBABILITY.value, "DCM", codes.PROBABILITY.meaning)
ALGORITHM_NAME = Coded("111001", "DCM", "Algorithm Name")
COMMENT = Coded(codes.COMMENT.value, "DCM", codes.COMMENT.meaning)
NORMAL = codes.class_code(LesionClass.NORMAL)
UNIT_ONE = Coded("1", "UCUM", "no units")
REPRESENTATIONS = ("A", "I", "P")
"""XPN-8 Name Representation Code of each DICOM PN component group (alphabetic, ideographic, phonetic)."""


@dataclass(frozen=True)
class BuiltMessage:
    control_id: str
    """MSH-10; the ACK's MSA-2 must repeat it."""
    text: str
    """ER7, segments separated by carriage returns."""


def control_id(sop_instance_uid: str, destination: str) -> str:
    """MSH-10 for one SR revision to one destination: the same on every retry, so a receiver can drop repeats."""
    return hashlib.sha256(f"{sop_instance_uid}|{destination}".encode()).hexdigest()[:20].upper()


def build_oru(report: StudyReportContent, destination: HL7, *, now: datetime | None = None) -> BuiltMessage:
    """The ORU^R01 for ``report`` addressed to ``destination``; OutputError when it cannot be one."""
    if not report.patient_id:
        raise OutputError("the study has no Patient ID: an HL7 result needs PID-3")
    now = now or datetime.now(UTC)
    status = "C" if report.corrects else "F"
    ident = control_id(report.sop_instance_uid, destination.name)
    try:
        message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
        _msh(message.msh, destination, ident, now)
        result = message.add_group("ORU_R01_PATIENT_RESULT")
        _pid(result.add_group("ORU_R01_PATIENT").add_segment("PID"), report)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        _orc(order.add_segment("ORC"), report)
        _obr(order.add_segment("OBR"), report, status)
        observations = _observations(report)
        for number, (value_type, identifier, value, extra) in enumerate(observations, start=1):
            obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
            obx.obx_1 = str(number)
            obx.obx_2 = value_type
            _ce(obx.obx_3, identifier)
            # OBX-5 is "varies": it takes escaped ER7 text of the type OBX-2 names
            obx.obx_5 = _coded_er7(value) if isinstance(value, Coded) else v2_5_1.ST(value).to_er7()
            for key, item in extra.items():
                if isinstance(item, Coded):
                    _ce(getattr(obx, key), item)
                else:
                    setattr(obx, key, item)
            obx.obx_11 = status
            if report.content_datetime:
                obx.obx_14 = report.content_datetime
        message.validate()
        text = message.to_er7()
    except HL7apyException as exc:
        raise OutputError(f"hl7apy refused the ORU^R01 for SR {report.sop_instance_uid}: {exc}") from exc
    return BuiltMessage(control_id=ident, text=text)


def _msh(msh: Segment, destination: HL7, ident: str, now: datetime) -> None:
    _put(msh.msh_3, "hd_1", destination.sending_application)
    if destination.sending_facility:
        _put(msh.msh_4, "hd_1", destination.sending_facility)
    _put(msh.msh_5, "hd_1", destination.receiving_application)
    _put(msh.msh_6, "hd_1", destination.receiving_facility)
    msh.msh_7 = now.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = ident
    msh.msh_11 = destination.processing_id
    msh.msh_12 = VERSION
    msh.msh_18 = destination.charset


def _pid(pid: Segment, report: StudyReportContent) -> None:
    pid.pid_1 = "1"
    _put(pid.pid_3, "cx_1", report.patient_id)
    if report.issuer_of_patient_id:
        _put(pid.pid_3.cx_4, "hd_1", report.issuer_of_patient_id)
    pid.pid_3.cx_5 = "MR"
    first = True
    for representation, group in zip(REPRESENTATIONS, report.patient_name.split("="), strict=False):
        parts = (group.split("^") + [""] * 5)[:5]  # DICOM: family^given^middle^prefix^suffix
        if not any(parts):
            continue
        xpn = pid.pid_5 if first else pid.add_field("PID_5")
        first = False
        family, given, middle, prefix, suffix = parts
        for name, value in (("xpn_1", family), ("xpn_2", given), ("xpn_3", middle), ("xpn_4", suffix),
                            ("xpn_5", prefix)):
            if value:
                component = getattr(xpn, name)
                if name == "xpn_1":
                    _put(component, "fn_1", value)
                else:
                    _put(xpn, name, value)
        xpn.xpn_7 = "L"
        xpn.xpn_8 = representation
    if first:
        pid.pid_5.xpn_7 = "U"  # unknown name: a type code alone, as HL7 allows for an unnamed patient
    if len(report.birth_date) == 8 and report.birth_date.isdigit():
        pid.pid_7 = report.birth_date
    if report.sex in ("M", "F", "O"):
        pid.pid_8 = report.sex


def _order_numbers(report: StudyReportContent) -> tuple[str, str]:
    """Placer and filler order number: the accession number; with none, only a filler number (the study UID)."""
    if report.accession_number:
        return report.accession_number, report.accession_number
    return "", report.study_instance_uid


def _orc(orc: Segment, report: StudyReportContent) -> None:
    placer, filler = _order_numbers(report)
    orc.orc_1 = "RE"
    if placer:
        _put(orc.orc_2, "ei_1", placer)
    _put(orc.orc_3, "ei_1", filler)


def _obr(obr: Segment, report: StudyReportContent, status: str) -> None:
    placer, filler = _order_numbers(report)
    obr.obr_1 = "1"
    if placer:
        _put(obr.obr_2, "ei_1", placer)
    _put(obr.obr_3, "ei_1", filler)
    _ce(obr.obr_4, PROCEDURE)
    if len(report.study_date) == 8 and report.study_date.isdigit():
        obr.obr_7 = report.study_date
    if report.content_datetime:
        obr.obr_22 = report.content_datetime
    obr.obr_25 = status


Observation = tuple[str, Coded, "Coded | str", dict[str, "Coded | str"]]


def _observations(report: StudyReportContent) -> list[Observation]:
    """(OBX-2, OBX-3, OBX-5, other fields) of every OBX, in message order."""
    rows: list[Observation] = [("CWE", CONCLUSION, report.conclusion, {})]
    for reported in report.classes:
        normal = (reported.finding.value, reported.finding.scheme) == (NORMAL.value, NORMAL.scheme_designator)
        rows.append(("NM", reported.finding, f"{reported.probability:.4f}",
                     {"obx_6": UNIT_ONE, "obx_8": "N" if normal else "A", "obx_17": PROBABILITY}))
    for model in report.models:
        label = f"{model.name} {model.version} weights sha256 {model.weights_sha256}".strip()
        if model.untrained:
            label += " (untrained)"
        rows.append(("ST", ALGORITHM_NAME, label, {}))
    if report.untrained_warning:
        rows.append(("ST", COMMENT, report.untrained_warning, {}))
    return rows


def _ce(field: Field, code: Coded) -> None:
    """A CE/CWE value: identifier ^ text ^ coding system, each escaped."""
    prefix = field.datatype.lower()
    _put(field, f"{prefix}_1", code.value)
    _put(field, f"{prefix}_2", code.meaning)
    _put(field, f"{prefix}_3", code.scheme)


def _coded_er7(code: Coded) -> str:
    """identifier^text^coding system, each component escaped by hl7apy's ST."""
    return "^".join(v2_5_1.ST(part).to_er7() for part in (code.value, code.meaning, code.scheme))


def _put(parent: Element, name: str, value: str) -> None:
    """``parent.<name> = value`` as the child's own primitive type, which escapes HL7 delimiters on output."""
    datatype = getattr(parent, name).datatype
    kind = getattr(v2_5_1, datatype) if datatype in _PRIMITIVES else v2_5_1.ST
    setattr(parent, name, kind(value))


_PRIMITIVES = frozenset({"ST", "IS", "ID", "TX", "FT"})
