"""Retention: remove stored inputs and outputs older than ``retention.days``.

Nothing undelivered is removed: an instance's file goes only when every output made
from it was sent everywhere, an output's file only when it was sent everywhere. Rows
stay (with ``removed_at``) so the audit trail and results keep their meaning.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import exists, select

from gastrolens.config import Settings
from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType, DeliveryState, InstanceState, Outcome
from gastrolens.db.tables import Delivery, Instance, Output, utcnow
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)


class RetentionStep:
    def __init__(self, settings: Settings, db: Database, store: Store, worker: str) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker = worker

    def run_once(self) -> int:
        if not self.settings.retention.enabled:
            return 0
        cutoff = utcnow() - timedelta(days=self.settings.retention.days)
        unsent = exists().where(Delivery.output_id == Output.id, Delivery.state != DeliveryState.SENT)
        outputs = select(Output).where(Output.created_at < cutoff, Output.removed_at.is_(None), ~unsent)
        instance_unsent = exists().where(Output.instance_id == Instance.id,
                                         exists().where(Delivery.output_id == Output.id,
                                                        Delivery.state != DeliveryState.SENT))
        instances = select(Instance).where(Instance.received_at < cutoff, Instance.removed_at.is_(None),
                                           Instance.state.in_((InstanceState.DONE, InstanceState.FAILED)),
                                           ~instance_unsent)
        removed = 0
        with self.db.session() as session:
            for row in list(session.scalars(outputs)) + list(session.scalars(instances)):
                existed = self.store.remove(row.file_path)
                row.removed_at = utcnow()
                kind = "output" if isinstance(row, Output) else "instance"
                audit.record(session, audit.Event(
                    type=AuditEventType.RETENTION_REMOVED, actor=self.worker, outcome=Outcome.SUCCESS, sop_uid=row.sop_instance_uid,
                    detail={"kind": kind, "id": row.id, "path": row.file_path, "file_existed": existed,
                            "retention_days": self.settings.retention.days}))
                removed += 1
        if removed:
            log.info("retention removed %d file(s) older than %d days", removed, self.settings.retention.days)
        return removed
