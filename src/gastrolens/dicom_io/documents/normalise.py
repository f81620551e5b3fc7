"""Read what real sources send: fill and repair the header so every decodable image gets outputs.

Real PACS and endoscopes leave out Type 1 and Type 2 attributes, misspell defined terms
and character sets, and put frames where the IOD has none. None of that changes what the
image shows, so instead of failing the image we derive its outputs from a repaired copy of
the header, repaired only as the standard allows (an empty Type 2 value means "unknown";
an unknown character set is read as the default repertoire), and record each repair as a
*quirk*: a short string stored with the result and in the audit trail.

The source file itself is never changed. When nothing needs repair the source is used as
it is (no copy), so the common case costs a few attribute reads.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from highdicom.enum import SpecificCharacterSetValues
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gastrolens.dicom_io.documents.common import SINGLE_FRAME_CLASSES, source_header

logger = logging.getLogger(__name__)

VL_ENDOSCOPIC_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.77.1.1", "1.2.840.10008.5.1.4.1.1.77.1.1.1"})
KNOWN_CHARSETS = frozenset(v.value for v in SpecificCharacterSetValues)
DEFAULT_REPERTOIRE = ("ISO_IR 6", "ISO 2022 IR 6", "")
TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
TYPE2_DATES = frozenset({"StudyDate", "StudyTime", "PatientBirthDate"})
SEX_TERMS = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_ORIENTATION = re.compile(r"^[APRLHFOM]+$")
_TIME = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


@dataclass(frozen=True, kw_only=True)
class Normalised:
    """The header outputs are derived from, and what had to be repaired in it."""

    header: Dataset
    """The source itself when nothing was wrong, else a repaired copy without pixel data."""
    quirks: tuple[str, ...]


Repair = Callable[[Dataset], str]
"""Changes the header copy and says what it did."""


def normalise_source(source: Dataset) -> Normalised:
    """Find what the output builders would refuse or copy wrongly, and repair a copy."""
    repairs: list[Repair] = []
    sop_class = str(source.get("SOPClassUID", ""))
    _check_modality(source, sop_class, repairs)
    _check_charset(source, repairs)
    _check_frames(source, sop_class, repairs)
    _check_terms(source, repairs)
    _check_dates(source, repairs)
    if not repairs:
        return Normalised(header=source, quirks=())
    header = source_header(source)
    quirks = tuple(repair(header) for repair in repairs)
    for quirk in quirks:
        logger.warning("source instance %s: %s", source.get("SOPInstanceUID", "?"), quirk)
    return Normalised(header=header, quirks=quirks)


def _set(keyword: str, value: object, quirk: str) -> Repair:
    def repair(header: Dataset) -> str:
        setattr(header, keyword, value)
        return quirk

    return repair


def _drop(keyword: str, quirk: str) -> Repair:
    def repair(header: Dataset) -> str:
        if keyword in header:
            del header[keyword]
        return quirk

    return repair


def _check_modality(source: Dataset, sop_class: str, repairs: list[Repair]) -> None:
    modality = str(source.get("Modality") or "").strip()
    if not modality:
        value = "ES" if sop_class in VL_ENDOSCOPIC_CLASSES else "OT"
        repairs.append(_set("Modality", value, f"Modality missing: wrote {value}"))
    elif modality != modality.upper() or modality != str(source.Modality):
        quirk = f"Modality {str(source.Modality)!r}: wrote {modality.upper()}"
        repairs.append(_set("Modality", modality.upper(), quirk))


def _check_charset(source: Dataset, repairs: list[Repair]) -> None:
    if "SpecificCharacterSet" not in source:
        return
    value = source.SpecificCharacterSet
    terms = [str(v).strip() for v in (value if isinstance(value, (list, MultiValue)) else [value])]
    if all(term in KNOWN_CHARSETS for term in terms):
        return
    if all(term in KNOWN_CHARSETS or term in DEFAULT_REPERTOIRE for term in terms):
        repairs.append(_standard_charset(terms))  # legal spellings highdicom does not take
        return
    shown = _joined(terms)
    logger.warning("Specific Character Set %r is unknown: reading the source as the default repertoire", shown)

    def repair(header: Dataset) -> str:
        del header.SpecificCharacterSet
        replaced = 0
        for elem in header:
            if elem.VR in TEXT_VRS and elem.VM >= 1 and elem.value is not None:
                text = str(elem.value) if elem.VM == 1 else "\\".join(str(v) for v in elem.value)
                ascii_text = text.encode("ascii", errors="replace").decode("ascii")
                if ascii_text != text:
                    replaced += 1
                    elem.value = ascii_text if elem.VM == 1 else ascii_text.split("\\")
        note = f", {replaced} value(s) with other characters written with '?'" if replaced else ""
        return f"SpecificCharacterSet {shown!r} unknown: read as the default repertoire{note}"

    repairs.append(repair)


def _standard_charset(terms: list[str]) -> Repair:
    """'ISO_IR 6' alone is the default repertoire (no Specific Character Set needed); an
    empty first value of a code-extension set is ISO 2022 IR 6 (PS3.3 C.12.1.1.2)."""
    spelled = [t for t in terms if t not in ("ISO_IR 6", "")] if len(terms) == 1 else [
        "ISO 2022 IR 6" if t in ("", "ISO_IR 6") else t for t in terms
    ]

    def repair(header: Dataset) -> str:
        if spelled:
            header.SpecificCharacterSet = spelled if len(spelled) > 1 else spelled[0]
        else:
            del header.SpecificCharacterSet
        return f"SpecificCharacterSet {_joined(terms)!r} written as {_joined(spelled) or 'the default'}"

    return repair


def _check_frames(source: Dataset, sop_class: str, repairs: list[Repair]) -> None:
    if sop_class not in SINGLE_FRAME_CLASSES or "NumberOfFrames" not in source:
        return
    try:
        frames = int(source.NumberOfFrames)
    except (TypeError, ValueError):
        return  # number_of_frames() fails the image with its reason before we get here
    if frames == 1:
        repairs.append(_drop("NumberOfFrames", "NumberOfFrames 1 on a single-frame IOD: ignored"))
    elif frames > 1:
        # The header stays as it is: outputs reference the instance as a whole and name
        # the frame in labels (common.references_frames); the overlay is multi-frame.
        repairs.append(lambda header: f"NumberOfFrames {frames} on a single-frame IOD: frames named in labels, "
                       "not referenced by number")


def _check_terms(source: Dataset, repairs: list[Repair]) -> None:
    sex = source.get("PatientSex")
    if sex not in (None, "") and str(sex) not in ("M", "F", "O"):
        fixed = SEX_TERMS.get(str(sex).strip().upper(), "")
        quirk = f"PatientSex {str(sex)!r} is not a defined term: wrote {fixed or 'empty'}"
        repairs.append(_set("PatientSex", fixed, quirk))
    laterality = source.get("Laterality")
    if laterality not in (None, "") and str(laterality) not in ("R", "L"):
        fixed = str(laterality).strip().upper() if str(laterality).strip().upper() in ("R", "L") else ""
        quirk = f"Laterality {str(laterality)!r} is not R or L: wrote {fixed or 'empty'}"
        repairs.append(_set("Laterality", fixed, quirk))
    orientation = source.get("PatientOrientation")
    if orientation not in (None, ""):
        values = [str(v) for v in (orientation if isinstance(orientation, MultiValue) else [orientation])]
        if len(values) != 2 or not all(_ORIENTATION.match(v) for v in values):
            quirk = f"PatientOrientation {_joined(values)!r} is invalid: wrote empty"
            repairs.append(_set("PatientOrientation", "", quirk))
    number = source.get("InstanceNumber")
    if number not in (None, ""):
        try:
            int(str(number))
        except ValueError:
            repairs.append(_drop("InstanceNumber", f"InstanceNumber {str(number)!r} is not an integer: left out"))


def _joined(values: list[str]) -> str:
    return "\\".join(values)


def _check_dates(source: Dataset, repairs: list[Repair]) -> None:
    for elem in source:
        if elem.VR not in ("DA", "TM", "DT") or elem.tag.is_private or elem.VM != 1 or elem.value in (None, ""):
            continue
        text = str(elem.value).strip()
        if _valid(elem.VR, text):
            continue
        keyword = elem.keyword
        if elem.VR == "DA" and re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", text) and _valid("DA", text.replace(".", "")):
            repairs.append(_set(keyword, text.replace(".", ""), f"{keyword} {text!r} in ACR-NEMA form: wrote YYYYMMDD"))
        elif keyword in TYPE2_DATES:
            repairs.append(_set(keyword, "", f"{keyword} {text!r} is not a valid {elem.VR}: wrote empty"))
        elif keyword:
            repairs.append(_drop(keyword, f"{keyword} {text!r} is not a valid {elem.VR}: left out"))


def _valid(vr: str, text: str) -> bool:
    if vr == "DA":
        return _valid_date(text)
    if vr == "TM":
        return _valid_time(text)
    date, clock = text[:8], text[8:].split("+")[0].split("-")[0]
    return _valid_date(date) and (not clock or _valid_time(clock))


def _valid_date(text: str) -> bool:
    if not re.fullmatch(r"\d{8}", text):
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _valid_time(text: str) -> bool:
    match = _TIME.match(text)
    if not match:
        return False
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups()[:3])
    return hours < 24 and minutes < 60 and seconds < 61
