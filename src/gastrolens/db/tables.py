"""The tables, as SQLAlchemy 2.0 typed ORM classes.

Schema changes go through Alembic migrations in ``gastrolens/db/migrations``;
this module is what ``alembic revision --autogenerate`` compares against.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from gastrolens.db.states import (
    AuditEventType,
    CompletionSignalKind,
    DeliveryState,
    InstanceState,
    Outcome,
    ProcedureStepStatus,
)
from gastrolens.findings import CLASS_ORDER, LesionClass, OutputKind

UID = String(64)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _enum(cls: type) -> Enum:
    # Store the value ("received"), not the member name, as a plain string column.
    return Enum(cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e],
                validate_strings=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    conclusion: Mapped[str | None] = mapped_column(String(32))
    """The study-level finding of the latest study SR (a LesionClass value)."""
    report_revision: Mapped[int] = mapped_column(Integer, default=0)
    """How many study SRs were written; 0: none yet."""
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One received SOP instance version. A re-send with different bytes is a new version."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version"),
        Index("ix_instances_state_received", "state", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    state: Mapped[InstanceState] = mapped_column(_enum(InstanceState), default=InstanceState.RECEIVED)
    file_path: Mapped[str] = mapped_column(String(1024))
    """Relative to the storage root."""
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    """A later version with different content exists."""
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    """The image size (set when done): a study SR still references the image after retention removed the file."""
    quirks: Mapped[list[str] | None] = mapped_column(JSON)
    """What was wrong with the source and how its outputs were written anyway (None: nothing)."""
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Set when retention removed the stored file."""

    series: Mapped[Series] = relationship(back_populates="instances")
    study: Mapped[Study] = relationship()
    results: Mapped[list[Result]] = relationship(back_populates="instance")


class Quarantined(Base):
    """Bytes that could not be stored as an instance, kept with the reason."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    file_path: Mapped[str] = mapped_column(String(1024))
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    """The DICOM status the peer got."""
    sop_instance_uid: Mapped[str | None] = mapped_column(String(256))
    """As sent, possibly not a valid UID."""
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Result(Base):
    """The engine's finding for one frame of one instance."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("instance_id", "frame_number", "model_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    frame_number: Mapped[int] = mapped_column(Integer, default=1)
    p_normal: Mapped[float] = mapped_column(Float)
    p_pu: Mapped[float] = mapped_column(Float)
    p_egc_hgin: Mapped[float] = mapped_column(Float)
    p_agc: Mapped[float] = mapped_column(Float)
    p_smt: Mapped[float] = mapped_column(Float)
    predicted_class: Mapped[str] = mapped_column(String(16), index=True)
    lesion_present: Mapped[bool] = mapped_column(Boolean)
    lesion_area_fraction: Mapped[float] = mapped_column(Float)
    bbox: Mapped[list[int] | None] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    """As long as a model card allows (ModelCard.version)."""
    model_sha256: Mapped[str] = mapped_column(String(64))
    untrained: Mapped[bool] = mapped_column(Boolean)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    instance: Mapped[Instance] = relationship(back_populates="results")

    @property
    def probabilities(self) -> tuple[float, ...]:
        """The class probabilities in :data:`CLASS_ORDER`, as :class:`ImageFinding` holds them."""
        return tuple(float(getattr(self, probability_column(cls))) for cls in CLASS_ORDER)


def probability_column(cls: LesionClass) -> str:
    """The ``results`` column that holds the probability of ``cls`` (``p_<class value>``)."""
    return f"p_{cls.value}"


def probability_values(probabilities: tuple[float, ...]) -> dict[str, float]:
    """Column values for probabilities that follow :data:`CLASS_ORDER` (``Result(**...)``)."""
    return {probability_column(cls): float(p) for cls, p in zip(CLASS_ORDER, probabilities, strict=True)}


class Output(Base):
    """A DICOM object GastroLens wrote (SEG, SR, overlay, study SR)."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[OutputKind] = mapped_column(_enum(OutputKind))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    """The source instance; None for a study SR."""
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    file_path: Mapped[str] = mapped_column(String(1024))
    """Relative to the storage root."""
    revision: Mapped[int] = mapped_column(Integer, default=1)
    model_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="output")


class Delivery(Base):
    """One output on its way to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("output_id", "destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    output: Mapped[Output] = relationship(back_populates="deliveries")


class AuditEvent(Base):
    """One append-only, hash-chained audit row. Written only by `gastrolens.db.audit`."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    event_type: Mapped[AuditEventType] = mapped_column(_enum(AuditEventType), index=True)
    actor: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[Outcome] = mapped_column(_enum(Outcome))
    study_uid: Mapped[str | None] = mapped_column(String(256), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(256))
    sop_uid: Mapped[str | None] = mapped_column(String(256), index=True)
    detail: Mapped[str] = mapped_column(Text)
    """Canonical JSON (sorted keys), exactly as hashed."""
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class ProcedureStep(Base):
    """One Modality Performed Procedure Step (MPPS N-CREATE, then N-SET), as the workstation reported it."""

    __tablename__ = "procedure_steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    status: Mapped[ProcedureStepStatus] = mapped_column(_enum(ProcedureStepStatus))
    step_id: Mapped[str | None] = mapped_column(String(16))
    station_ae: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    referenced: Mapped[list[str]] = mapped_column(JSON, default=list)
    """SOP Instance UIDs the Performed Series Sequence lists (images and other composites)."""
    attributes: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    """The step's attributes as DICOM JSON, N-SET modifications applied."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the N-SET to COMPLETED or DISCONTINUED arrived."""


class CompletionSignal(Base):
    """A request that a study complete now (MPPS final state, or the ``studies complete`` command).

    Written by whoever hears it (receiver process, CLI); the completion job in any worker
    process polls for unhandled ones, so the signal travels through the database.
    """

    __tablename__ = "completion_signals"
    __table_args__ = (Index("ix_completion_signals_pending", "handled_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    kind: Mapped[CompletionSignalKind] = mapped_column(_enum(CompletionSignalKind))
    procedure_step_id: Mapped[int | None] = mapped_column(ForeignKey("procedure_steps.id"))
    actor: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    handled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(Text)
    """What the completion job did: the SR revision written, or why none was."""
