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
