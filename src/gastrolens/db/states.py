"""The closed sets of the database: states of instances, outputs and deliveries, audit event types."""

from __future__ import annotations

import enum


class InstanceState(str, enum.Enum):
    """received -> claimed -> done | failed (quarantined files never become instances)."""

    RECEIVED = "received"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(str, enum.Enum):
    """pending -> sent | retrying -> dead; an operator may queue a dead delivery again."""

    PENDING = "pending"
    SENT = "sent"
    RETRYING = "retrying"
    DEAD = "dead"


class Outcome(str, enum.Enum):
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"


class AuditEventType(str, enum.Enum):
    """Every kind of thing the audit trail records."""

    SERVICE_STARTED = "service.started"
    SERVICE_STOPPED = "service.stopped"
    ASSOCIATION_REJECTED = "association.rejected"
    INSTANCE_RECEIVED = "instance.received"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_NEW_VERSION = "instance.new_version"
    INSTANCE_QUARANTINED = "instance.quarantined"
    STORE_REFUSED = "instance.store_refused"
    INSTANCE_CLAIMED = "instance.claimed"
    INSTANCE_RECLAIMED = "instance.reclaimed"
    INSTANCE_DONE = "instance.done"
    INSTANCE_FAILED = "instance.failed"
    OUTPUT_WRITTEN = "output.written"
    STUDY_REPORTED = "study.reported"
    DELIVERY_SENT = "delivery.sent"
    DELIVERY_RETRYING = "delivery.retrying"
    DELIVERY_DEAD = "delivery.dead"
    DELIVERY_REQUEUED = "delivery.requeued"
    RETENTION_REMOVED = "retention.removed"
    QUERY = "query"
    AUDIT_VERIFIED = "audit.verified"
    AUDIT_EXPORTED = "audit.exported"
    DATABASE_UPGRADED = "database.upgraded"
    MODEL_LOADED = "model.loaded"
    COMMITMENT_REQUESTED = "commitment.requested"
    COMMITMENT_REPORTED = "commitment.reported"
    PROCEDURE_STEP_CREATED = "procedure_step.created"
    PROCEDURE_STEP_UPDATED = "procedure_step.updated"
    PROCEDURE_STEP_REFUSED = "procedure_step.refused"
    STUDY_COMPLETION_REQUESTED = "study.completion_requested"
    STUDY_COMPLETION_SETTLED = "study.completion_settled"


class ProcedureStepStatus(str, enum.Enum):
    """MPPS Performed Procedure Step Status (0040,0252): IN PROGRESS -> COMPLETED | DISCONTINUED."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class CompletionSignalKind(str, enum.Enum):
    """Why a study should complete now rather than when it has been quiet long enough."""

    MPPS_COMPLETED = "mpps-completed"
    MPPS_DISCONTINUED = "mpps-discontinued"
    COMMAND = "command"
