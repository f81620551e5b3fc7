"""What a reader may ask for: validated filters for studies, deliveries and the audit trail.

The CLI and the HTTP API both build these models from user input, so a filter is
checked once, the same way, before any query runs. Values only ever reach SQL as
bound parameters; the character rules below exist to give a clear error for input
that cannot be a DICOM value (``' OR 1=1 --`` is not a patient ID), not to make
queries safe.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gastrolens.db.states import AuditEventType, DeliveryState
from gastrolens.dicom_uid import is_dicom_uid
from gastrolens.findings import LesionClass

_DICOM_TEXT = re.compile(r"^[\w .,/+#^:-]*$")
"""Characters a patient ID or accession number filter may hold: letters, digits, space, . , / + # ^ : - _"""
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ISO_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:?\d{2})?$")

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_OFFSET = 1_000_000


class StudyState(str, enum.Enum):
    """Where a study stands, derived from its instances and deliveries (first that applies wins)."""

    QUEUED = "queued"
    """Some image still waits for, or is in, processing."""
    FAILED = "failed"
    """Some image could not be processed."""
    DELIVERY_DEAD = "delivery_dead"
    """Some output gave up on a destination."""
    DELIVERING = "delivering"
    """Some output is pending or retrying."""
    AWAITING_REPORT = "awaiting_report"
    """Every image is done but the study report is not written yet."""
    COMPLETE = "complete"
    """Reported and delivered."""


def check_uid(value: str, name: str = "uid") -> str:
    """Return ``value`` when it follows the DICOM UID grammar, else raise ValueError naming ``name``."""
    if not is_dicom_uid(value):
        raise ValueError(
            f"{name}: {value[:80]!r} is not a DICOM UID (digits and dots, no leading zeros, at most 64 characters)"
        )
    return value


def _uid(value: str | None) -> str | None:
    if value is None:
        return None
    if not is_dicom_uid(value):
        raise ValueError("not a DICOM UID (digits and dots, no leading zeros, at most 64 characters)")
    return value


def _dicom_text(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if not _DICOM_TEXT.match(value):
        raise ValueError("may hold only letters, digits, space and . , / + # ^ : - _")
    return value


def _iso_date(value: Any) -> Any:
    if isinstance(value, str) and not _ISO_DATE.match(value):
        raise ValueError("must be an ISO date, YYYY-MM-DD")
    return value


def _iso_datetime(value: Any) -> Any:
    if isinstance(value, str):
        if not _ISO_DATETIME.match(value):
            raise ValueError("must be an ISO date or date-time, e.g. 2025-03-01 or 2025-03-01T08:00:00Z")
        if _ISO_DATE.match(value):
            return datetime.combine(date.fromisoformat(value), time(), timezone.utc)
    return value


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class _Filter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=200)

    def described(self) -> dict[str, Any]:
        """The non-empty fields, JSON-ready, as the audit trail records them."""
        return {k: v for k, v in self.model_dump(mode="json").items() if v not in (None, [], ())}


class Paging(_Filter):
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"rows per page, 1..{MAX_LIMIT}")] = DEFAULT_LIMIT
    offset: Annotated[int, Field(ge=0, le=MAX_OFFSET, description="rows to skip")] = 0


class StudyFilter(_Filter):
    """Which studies: every given field must match."""

    study_uid: str | None = Field(None, description="Study Instance UID")
    patient_id: str | None = Field(None, max_length=64, description="Patient ID, exact")
    accession_number: str | None = Field(None, max_length=16, description="Accession Number, exact")
    date_from: date | None = Field(
        None,
        description="first study date (YYYY-MM-DD); studies without a Study Date match on the day they arrived (UTC)",
    )
    date_to: date | None = Field(None, description="last study date (YYYY-MM-DD), inclusive")
    finding: LesionClass | None = Field(None, description="the study conclusion, or the class of any of its images")
    state: StudyState | None = Field(None, description="where the study stands")

    @field_validator("study_uid")
    @classmethod
    def _check_uid(cls, value: str | None) -> str | None:
        return _uid(value)

    @field_validator("patient_id", "accession_number")
    @classmethod
    def _check_text(cls, value: str | None) -> str | None:
        return _dicom_text(value)

    @field_validator("date_from", "date_to", mode="before")
    @classmethod
    def _check_dates(cls, value: Any) -> Any:
        return _iso_date(value)

    @model_validator(mode="after")
    def _ordered(self) -> StudyFilter:
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError("date_from must not be after date_to")
        return self


class StudyQuery(StudyFilter, Paging):
    """A study filter plus a page (the query string of ``/api/studies``)."""


class DeliveryFilter(_Filter):
    state: DeliveryState | None = Field(None, description="pending, sent, retrying or dead")
    destination: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="destination name")
    study_uid: str | None = Field(None, description="Study Instance UID")

    @field_validator("study_uid")
    @classmethod
    def _check_uid(cls, value: str | None) -> str | None:
        return _uid(value)


class DeliveryQuery(DeliveryFilter, Paging):
    """A delivery filter plus a page (the query string of ``/api/deliveries``)."""


class AuditFilter(_Filter):
    """Audit events in ``[since, until)``; naive times and plain dates are UTC."""

    since: datetime | None = Field(None, description="first instant, ISO 8601 (inclusive)")
    until: datetime | None = Field(None, description="end instant, ISO 8601 (exclusive)")
    type: list[AuditEventType] = Field(default_factory=list, description="event types; any of them")
    actor: str | None = Field(None, max_length=256, pattern=r"^[\w .:@/+-]+$", description="actor, exact")
    study_uid: str | None = Field(None, description="Study Instance UID")

    @field_validator("study_uid")
    @classmethod
    def _check_uid(cls, value: str | None) -> str | None:
        return _uid(value)

    @field_validator("since", "until", mode="before")
    @classmethod
    def _check_times(cls, value: Any) -> Any:
        return _iso_datetime(value)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)

    @model_validator(mode="after")
    def _ordered(self) -> AuditFilter:
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


class AuditQuery(AuditFilter, Paging):
    """An audit filter plus a page (the query string of ``/api/audit``)."""

    order: Literal["asc", "desc"] = Field("desc", description="by id: asc is chain order, desc newest first")


def day_after(value: date) -> datetime:
    """Midnight UTC at the end of ``value``, for inclusive date ranges over timestamps."""
    return datetime.combine(value + timedelta(days=1), time(), timezone.utc)


def explain(exc: ValidationError) -> list[dict[str, str]]:
    """``[{"field": ..., "message": ...}]`` for each problem, in words a user can act on."""
    return explain_errors(exc.errors(include_url=False))


def explain_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """:func:`explain` for pydantic-style error dicts (also FastAPI's RequestValidationError)."""
    problems = []
    for err in errors:
        field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body", "header")) or "query"
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        ctx = err.get("ctx") or {}
        if err.get("type") == "enum" and "expected" in ctx:
            message = f"must be one of {ctx['expected']}"
        elif err.get("type") == "extra_forbidden":
            message = "unknown parameter"
        problems.append({"field": field, "message": message})
    return problems
