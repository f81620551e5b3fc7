"""Study Root Query/Retrieve identifiers: what a C-FIND, C-MOVE or C-GET asks for, and the answers.

:func:`parse_identifier` turns a request identifier into :class:`QueryKeys` or raises
:class:`IdentifierError` with the status PS3.4 C.4 gives (0xA900 for an identifier that
does not fit the Study Root model, 0xC000 for a key value that cannot be processed).
:func:`answer` builds one C-FIND response identifier from a :class:`Match`, with the
requested keys only, text in the stored data set's Specific Character Set (UTF-8 when
that set cannot hold the value).

The matching rules (the conformance statement repeats them): single value, universal
(empty or ``*``) and wildcard (``*``, ``?``) matching on Patient's Name, Patient ID and
Accession Number; Patient's Name case-insensitively and on any one of its component
groups; range matching on Study Date; list of UID matching on the unique key of the
query level; Modality / Modalities in Study and SOP Class UID / SOP Classes in Study
as single values.
"""

from __future__ import annotations

import enum
import re
import warnings
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from pydicom import dcmread
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from gastrolens.dicom_uid import is_dicom_uid

STATUS_IDENTIFIER_MISMATCH = 0xA900
"""Failure: the identifier does not match the SOP class (no or unknown level, unique keys missing)."""
STATUS_UNABLE_TO_PROCESS = 0xC000
"""Failure: a key value cannot be processed (a malformed date or UID, an undecodable identifier)."""
UTF8 = "ISO_IR 192"

MATCHED_KEYS = frozenset({
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName", "AccessionNumber",
    "StudyDate", "ModalitiesInStudy", "Modality", "SOPClassUID", "SOPClassesInStudy",
})
"""The keys GastroLens matches on (see :func:`parse_identifier`); any other key with a value is not matched."""
_CONTROL_KEYS = frozenset({"SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle"})


class Level(str, enum.Enum):
    """The Study Root levels (PATIENT is not one of them)."""

    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class IdentifierError(Exception):
    """A request identifier GastroLens does not process; ``status`` is what the peer gets."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, kw_only=True)
class QueryKeys:
    """The matching keys of one request; None or empty: universal matching."""

    level: Level
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()
    patient_id: str | None = None
    """Single value or wildcard pattern (``*``, ``?``)."""
    patient_name: str | None = None
    """Wildcard pattern, matched case-insensitively on the whole name or one component group."""
    accession_number: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    modalities: tuple[str, ...] = ()
    """Any of them (Modality at SERIES level, Modalities in Study at STUDY level)."""
    sop_class_uid: str | None = None

    def described(self) -> dict[str, object]:
        """The keys that restrict the match, JSON-ready, as the audit trail records them."""
        values: dict[str, object] = {
            "level": self.level.value,
            "study_uids": list(self.study_uids),
            "series_uids": list(self.series_uids),
            "sop_uids": list(self.sop_uids),
            "patient_id": self.patient_id,
            "patient_name": self.patient_name,
            "accession_number": self.accession_number,
            "date_from": self.date_from.isoformat() if self.date_from else None,
            "date_to": self.date_to.isoformat() if self.date_to else None,
            "modalities": list(self.modalities),
            "sop_class_uid": self.sop_class_uid,
        }
        return {k: v for k, v in values.items() if v not in (None, [])}


@dataclass(frozen=True, kw_only=True)
class Match:
    """One C-FIND answer; the series and image fields are set at those levels."""

    study_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    modalities_in_study: tuple[str, ...] = ()
    study_series: int = 0
    study_instances: int = 0
    series_uid: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_instances: int = 0
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    character_set: tuple[str, ...] = field(default_factory=tuple)
    """The stored data set's Specific Character Set values (empty: the default repertoire)."""


# -- parsing -------------------------------------------------------------------------------

_DATE = re.compile(r"^\d{8}$")


def parse_identifier(identifier: Dataset, *, retrieve: bool) -> QueryKeys:
    """The keys of a C-FIND (``retrieve`` False) or C-MOVE / C-GET identifier."""
    try:
        level_text = _text(identifier, "QueryRetrieveLevel")
    except (ValueError, TypeError, LookupError) as exc:
        raise IdentifierError(STATUS_UNABLE_TO_PROCESS, f"identifier does not decode: {exc}") from exc
    if not level_text:
        raise IdentifierError(STATUS_IDENTIFIER_MISMATCH, "no Query/Retrieve Level (0008,0052)")
    try:
        level = Level(level_text.upper())
    except ValueError:
        raise IdentifierError(
            STATUS_IDENTIFIER_MISMATCH, f"level {level_text[:16]!r} is not STUDY, SERIES or IMAGE (Study Root)"
        ) from None
    try:
        return _keys(identifier, level, retrieve)
    except IdentifierError:
        raise
    except (ValueError, TypeError, LookupError, AttributeError) as exc:  # pydicom on malformed values
        raise IdentifierError(STATUS_UNABLE_TO_PROCESS, f"identifier does not decode: {exc}") from exc


def _keys(identifier: Dataset, level: Level, retrieve: bool) -> QueryKeys:
    depth = list(Level).index(level)
    unique = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    uids: list[tuple[str, ...]] = []
    for index, keyword in enumerate(unique[: depth + 1]):
        values = _uids(identifier, keyword)
        if index < depth and len(values) != 1:
            raise IdentifierError(
                STATUS_IDENTIFIER_MISMATCH, f"a {level.value} level request needs exactly one {keyword}"
            )
        if index == depth and retrieve and not values:
            raise IdentifierError(STATUS_IDENTIFIER_MISMATCH, f"a {level.value} level retrieve needs {keyword}")
        uids.append(values)
    uids += [()] * (3 - len(uids))
    date_from, date_to = _date_range(_text(identifier, "StudyDate"))
    modality_key = "ModalitiesInStudy" if level is Level.STUDY and "ModalitiesInStudy" in identifier else "Modality"
    sop_class_key = "SOPClassesInStudy" if "SOPClassesInStudy" in identifier else "SOPClassUID"
    sop_class = _pattern(_text(identifier, sop_class_key))
    if sop_class is not None and not is_dicom_uid(sop_class):
        raise IdentifierError(STATUS_UNABLE_TO_PROCESS, f"{sop_class_key} {sop_class[:64]!r} is not a UID")
    return QueryKeys(
        level=level,
        study_uids=uids[0],
        series_uids=uids[1],
        sop_uids=uids[2],
        patient_id=_pattern(_text(identifier, "PatientID")),
        patient_name=_pattern(_text(identifier, "PatientName")),
        accession_number=_pattern(_text(identifier, "AccessionNumber")),
        date_from=date_from,
        date_to=date_to,
        modalities=tuple(m for m in _values(identifier, modality_key) if m not in ("", "*")),
        sop_class_uid=sop_class,
    )


def _values(identifier: Dataset, keyword: str) -> list[str]:
    if keyword not in identifier:
        return []
    value = identifier[keyword].value
    if value is None:
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def _text(identifier: Dataset, keyword: str) -> str:
    values = _values(identifier, keyword)
    if len(values) > 1:
        raise IdentifierError(STATUS_IDENTIFIER_MISMATCH, f"{keyword} must hold one value, not {len(values)}")
    return values[0] if values else ""


def _uids(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    values = tuple(v for v in _values(identifier, keyword) if v != "*")
    for uid in values:
        if not is_dicom_uid(uid):
            raise IdentifierError(STATUS_UNABLE_TO_PROCESS, f"{keyword} {uid[:64]!r} is not a UID")
    return values


def _pattern(value: str) -> str | None:
    """None for universal matching (empty, or nothing but ``*``)."""
    return None if not value or set(value) == {"*"} else value


def _date_range(value: str) -> tuple[date | None, date | None]:
    """A DA value or range (``A``, ``A-B``, ``-B``, ``A-``) as inclusive bounds."""
    if not value:
        return None, None
    first, dash, last = value.partition("-")
    bounds = [_date(first), _date(last)] if dash else [_date(first)] * 2
    if dash and bounds == [None, None]:
        raise IdentifierError(STATUS_UNABLE_TO_PROCESS, "StudyDate range '-' names no date")
    if bounds[0] and bounds[1] and bounds[0] > bounds[1]:
        raise IdentifierError(STATUS_UNABLE_TO_PROCESS, f"StudyDate range {value!r} ends before it starts")
    return bounds[0], bounds[1]


def _date(text: str) -> date | None:
    text = text.strip()
    if not text:
        return None
    if not _DATE.match(text):
        raise IdentifierError(STATUS_UNABLE_TO_PROCESS, f"StudyDate {text[:20]!r} is not YYYYMMDD")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise IdentifierError(STATUS_UNABLE_TO_PROCESS, f"StudyDate {text!r} is not a calendar date") from None


# -- answers -------------------------------------------------------------------------------


def unsupported_keys(request: Dataset, level: Level) -> list[str]:
    """The request's optional keys GastroLens does not support, for C-FIND's 0xFF01 warning (PS3.4 C.4.1.1.4).

    A key is unsupported for existence when :func:`answer` returns it empty at ``level``
    (GastroLens does not keep it), and for matching when it carries a value (other than
    ``*``) that GastroLens does not match on.
    """
    placeholder = Match(study_uid="", series_uid="" if level is not Level.STUDY else None,
                        sop_uid="" if level is Level.IMAGE else None)
    returned = _known_values(placeholder).keys()
    found = []
    for element in request:
        keyword = element.keyword
        if not keyword or keyword in _CONTROL_KEYS:
            continue
        universal = element.is_empty or (element.VR != "SQ" and set(str(element.value).strip()) <= {"*"})
        if keyword not in returned or (not universal and keyword not in MATCHED_KEYS):
            found.append(keyword)
    return found



def answer(match: Match, keys: QueryKeys, request: Dataset, retrieve_ae_title: str) -> Dataset:
    """The response identifier for ``match``: every key the request holds, filled where known."""
    known = _known_values(match)
    response = Dataset()
    text: list[str] = []
    for element in request:
        keyword = element.keyword
        if keyword in ("SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle") or not keyword:
            continue
        if keyword in known:
            value = known[keyword]
            response.add_new(element.tag, element.VR, value)
            text += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
        else:  # a key GastroLens does not keep: returned empty, as PS3.4 C.4.1.1.3.2 allows
            response.add(DataElement(element.tag, element.VR, [] if element.VR == "SQ" else None))
    response.QueryRetrieveLevel = keys.level.value
    response.RetrieveAETitle = retrieve_ae_title
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[: list(Level).index(keys.level) + 1]:
        setattr(response, keyword, known[keyword])
    character_set = response_character_set(match.character_set, text)
    if character_set:
        response.SpecificCharacterSet = character_set if len(character_set) > 1 else character_set[0]
    return response


def response_character_set(stored: tuple[str, ...], text: list[str]) -> tuple[str, ...]:
    """The stored data set's character set when it can hold ``text``; else UTF-8 (nothing when ASCII does)."""
    if all(t.isascii() for t in text):
        return stored
    if stored:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom warns and substitutes when a value does not fit
            try:
                encodings = convert_encodings(list(stored))
                for value in text:
                    encode_string(value, encodings)
                return stored
            except (UserWarning, LookupError, ValueError, UnicodeError):
                pass
    return (UTF8,)


def stored_character_set(path: Path) -> tuple[str, ...]:
    """The Specific Character Set of a stored file (empty: the default repertoire, or unreadable)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SpecificCharacterSet"])
    except (OSError, InvalidDicomError, ValueError):
        return ()
    value = ds.get("SpecificCharacterSet")
    values = [value] if isinstance(value, str) else list(value or ())
    return tuple(str(v).strip() for v in values) if any(str(v).strip() for v in values) else ()


def _known_values(match: Match) -> dict[str, object]:
    values: dict[str, object] = {
        "StudyInstanceUID": match.study_uid,
        "PatientID": match.patient_id or "",
        "PatientName": match.patient_name or "",
        "AccessionNumber": match.accession_number or "",
        "StudyDate": match.study_date or "",
        "StudyDescription": match.study_description or "",
        "ModalitiesInStudy": list(match.modalities_in_study),
        "NumberOfStudyRelatedSeries": match.study_series,
        "NumberOfStudyRelatedInstances": match.study_instances,
    }
    if match.series_uid is not None:
        values |= {
            "SeriesInstanceUID": match.series_uid,
            "Modality": match.modality or "",
            "SeriesNumber": match.series_number if match.series_number is not None else "",
            "NumberOfSeriesRelatedInstances": match.series_instances,
        }
    if match.sop_uid is not None:
        values |= {"SOPInstanceUID": match.sop_uid, "SOPClassUID": match.sop_class_uid or ""}
    return values
