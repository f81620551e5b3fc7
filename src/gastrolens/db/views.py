"""Read models: what the read-side queries return to the CLI, the HTTP API and the dashboard.

They are frozen pydantic models so one definition serves as the JSON the CLI prints,
the API's response schema in its OpenAPI document and the dashboard's template data.
"""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from gastrolens.db.filters import StudyState
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState, Outcome
from gastrolens.findings import OutputKind

T = TypeVar("T")


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class Page(_View, Generic[T]):
    """One page of a longer list; ``next_offset`` is None on the last page."""

    items: list[T]
    total: int = Field(description="rows matching the filter, over all pages")
    limit: int
    offset: int
    next_offset: int | None


class Probabilities(_View):
    normal: float
    pu: float
    egc_hgin: float
    agc: float
    smt: float


class ResultView(_View):
    """The networks' finding for one frame."""

    frame_number: int
    probabilities: Probabilities
    predicted_class: str
    lesion_present: bool
    lesion_area_fraction: float = Field(description="share of the frame's pixels inside the lesion mask, 0..1")
    bbox: list[int] | None = Field(description="row_min, col_min, row_max, col_max (exclusive maxima) of the mask")
    model_name: str
    model_version: str
    model_sha256: str
    untrained: bool
    current: bool = Field(description="the latest result for this frame (earlier ones came from other models)")
    created_at: datetime


class DeliveryView(_View):
    """One output on its way to one destination."""

    id: int
    destination: str
    state: DeliveryState
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    updated_at: datetime | None
    sent_at: datetime | None


class QueueDeliveryView(DeliveryView):
    """A delivery with what it carries, for the queue view."""

    output_kind: OutputKind
    output_sop_uid: str
    study_uid: str
    source_sop_uid: str | None
    destination_kind: str | None = Field(None, description="dicom, folder, dicomweb or hl7, as the destination is "
                                         "configured now; None when it is no longer configured")
    last_status_text: str | None = Field(None, description="last_status as its kind means it: 0xA700, HTTP 503")


class FailedInstanceView(_View):
    """An image that could not be processed, for the queue view."""

    sop_instance_uid: str
    version: int
    study_uid: str
    attempts: int
    error: str | None
    received_at: datetime
    finished_at: datetime | None


class OutputView(_View):
    """A DICOM object GastroLens wrote, and where it went."""

    kind: OutputKind
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    source_sop_uid: str | None = Field(description="the image it was made from; None for a study SR")
    file_path: str = Field(description="relative to the storage root")
    revision: int
    model_sha256: str
    created_at: datetime
    removed_at: datetime | None
    deliveries: list[DeliveryView]


class InstanceView(_View):
    """A received image (one version of a SOP instance) with its results and outputs."""

    sop_instance_uid: str
    version: int
    superseded: bool
    study_uid: str
    series_uid: str
    sop_class_uid: str
    state: InstanceState
    attempts: int
    error: str | None
    quirks: list[str] = []
    """What was wrong with the source and how it was read anyway (missing Modality, odd character set...)."""
    received_at: datetime
    finished_at: datetime | None
    removed_at: datetime | None
    results: list[ResultView]
    outputs: list[OutputView]


class StudySummary(_View):
    """One row of the study list."""

    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None = Field(description="DICOM Study Date, YYYYMMDD")
    study_description: str | None
    first_received_at: datetime
    last_received_at: datetime
    state: StudyState
    conclusion: str | None = Field(description="the finding of the latest study report (a class), None until reported")
    report_revision: int
    reported_at: datetime | None
    images: int = Field(description="current images (later versions replace earlier ones)")
    images_done: int
    images_failed: int
    images_queued: int
    findings: dict[str, int] = Field(description="images per predicted class, from each frame's current result")
    deliveries: dict[str, int] = Field(description="deliveries of the study's outputs per state")
    untrained: bool = Field(description="some result came from untrained weights (not for diagnostic use)")


class StudyDetail(StudySummary):
    """A study with its images, their results and outputs, and the study-level outputs."""

    instances: list[InstanceView]
    study_outputs: list[OutputView]


class AuditRow(_View):
    """One audit event exactly as chained: ``hash = sha256(prev_hash + canonical content)``."""

    id: int
    at: datetime
    event_type: AuditEventType
    actor: str
    outcome: Outcome
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    detail: str = Field(description="canonical JSON, exactly as hashed")
    prev_hash: str
    hash: str
