"""Decide whether received bytes are a storable instance, without decoding pixels.

Returns the few header fields the store and the database need, or raises
:class:`InvalidInstanceError` carrying the DICOM failure status the peer gets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from gastrolens.errors import InvalidInstanceError

STATUS_CANNOT_UNDERSTAND = 0xC000
"""Failure: the bytes do not parse as DICOM."""
STATUS_DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""Failure: the data set lacks what its SOP class requires, or names another SOP class."""

REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class InstanceHeader:
    """What the store and the database keep about a received instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str
    size_bytes: int
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    series_number: int | None


def is_valid_uid(value: object) -> bool:
    """The DICOM UID grammar (PS3.5 9.1): digits and dots, no leading zeros, at most 64 chars."""
    return isinstance(value, str) and UID(value).is_valid


def inspect_instance(data: bytes, negotiated_sop_class: str | None = None) -> InstanceHeader:
    """Parse ``data`` (a Part 10 file as received) and check it can be stored."""
    try:
        ds = dcmread(BytesIO(data), force=False)
        ds.SOPInstanceUID  # noqa: B018 - touches the header far enough to find truncation
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        raise InvalidInstanceError(f"the data set does not parse: {exc}", STATUS_CANNOT_UNDERSTAND) from exc
    except Exception as exc:  # pydicom raises a wide variety on corrupt input
        raise InvalidInstanceError(f"the data set does not parse: {exc.__class__.__name__}: {exc}", STATUS_CANNOT_UNDERSTAND) from exc

    for keyword in REQUIRED_UIDS:
        value = ds.get(keyword)
        if not value:
            raise InvalidInstanceError(f"missing {keyword}", STATUS_DOES_NOT_MATCH_SOP_CLASS)
        if not is_valid_uid(str(value)):
            raise InvalidInstanceError(f"{keyword} {str(value)[:80]!r} breaks the DICOM UID grammar", STATUS_DOES_NOT_MATCH_SOP_CLASS)
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise InvalidInstanceError("no Pixel Data", STATUS_DOES_NOT_MATCH_SOP_CLASS)
    if negotiated_sop_class and str(ds.SOPClassUID) != negotiated_sop_class:
        raise InvalidInstanceError(
            f"SOP Class UID {ds.SOPClassUID} differs from the negotiated {negotiated_sop_class}",
            STATUS_DOES_NOT_MATCH_SOP_CLASS,
        )
    meta = getattr(ds, "file_meta", Dataset())
    return InstanceHeader(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
    )


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a value that does not decode in its character set is not worth failing on
        return None
    return str(value) if value not in (None, "") else None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
