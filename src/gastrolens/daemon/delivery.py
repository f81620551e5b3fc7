"""Delivery: every output goes to each destination, with exponential backoff, then ``dead``.

Each attempt is audited with the peer's status. A destination is a DICOM peer
(C-STORE, TLS when configured) or a folder (an atomic copy).
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from gastrolens.config import Settings
from gastrolens.config.schema import Destination
from gastrolens.db import Database, audit
from gastrolens.db.queue import claim_deliveries
from gastrolens.db.states import AuditEventType, DeliveryState, Outcome
from gastrolens.db.tables import Delivery, Output, Study, utcnow
from gastrolens.storage.atomic import write_atomic
from gastrolens.dicom_io.net.send import SendResult, send_files
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)

BATCH = 64


class DeliveryStep:
    def __init__(self, settings: Settings, db: Database, store: Store, worker: str) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker = worker
        self.destinations = {d.name: d for d in settings.destinations}

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many attempts were made."""
        with self.db.session() as session:
            ids = claim_deliveries(session, self.worker, BATCH, self.settings.scheduler.lease_seconds)
            rows = session.execute(
                select(Delivery.id, Delivery.destination, Output.file_path, Output.sop_class_uid,
                       Output.sop_instance_uid, Output.series_instance_uid, Study.study_instance_uid)
                .join(Output, Delivery.output_id == Output.id).join(Study, Output.study_id == Study.id)
                .where(Delivery.id.in_(ids))
            ).all() if ids else []
        by_destination: dict[str, list] = defaultdict(list)
        for row in rows:
            by_destination[row.destination].append(row)
        for name, items in by_destination.items():
            destination = self.destinations.get(name)
            results: Iterator[SendResult]
            if destination is None:
                results = (SendResult(Path(r.file_path), -1, f"destination {name!r} is no longer configured")
                           for r in items)
            elif destination.folder is not None:
                results = (self._copy(destination, r) for r in items)
            else:
                results = send_files([(self.store.absolute(r.file_path), r.sop_class_uid) for r in items],
                                     destination, self.settings.dicom.ae_title)
            # Results come one by one as the peer answers; each is recorded before the next is sent.
            # `results` goes first so the sender is exhausted (and its association released) at the end.
            for result, row in zip(results, items, strict=True):
                self._record(row, destination, result)
        return len(rows)

    def _copy(self, destination: Destination, row) -> SendResult:  # type: ignore[no-untyped-def]
        source = self.store.absolute(row.file_path)
        target = Path(destination.folder) / row.study_instance_uid / f"{row.sop_instance_uid}.dcm"  # type: ignore[arg-type]
        try:
            with open(source, "rb") as fh:
                write_atomic(target, lambda out: shutil.copyfileobj(fh, out), fsync=self.settings.storage.fsync)
        except OSError as exc:
            return SendResult(source, None, f"cannot copy to {target.parent}: {exc.strerror or exc}")
        return SendResult(source, 0x0000)

    def _record(self, row, destination: Destination | None, result: SendResult) -> None:  # type: ignore[no-untyped-def]
        delivery_settings = self.settings.delivery
        with self.db.session() as session:
            delivery = session.get(Delivery, row.id)
            if delivery is None or delivery.claimed_by != self.worker:
                return
            delivery.attempts += 1
            delivery.last_status = result.status
            delivery.last_error = result.error
            delivery.claimed_by = delivery.lease_expires_at = None
            now = utcnow()
            if result.ok:
                delivery.state, delivery.sent_at = DeliveryState.SENT, now
                event, outcome = AuditEventType.DELIVERY_SENT, Outcome.SUCCESS
            elif result.retryable and delivery.attempts < delivery_settings.max_attempts:
                delay = min(delivery_settings.backoff_seconds * 2 ** (delivery.attempts - 1),
                            delivery_settings.max_backoff_seconds)
                delivery.state, delivery.next_attempt_at = DeliveryState.RETRYING, now + timedelta(seconds=delay)
                event, outcome = AuditEventType.DELIVERY_RETRYING, Outcome.WARNING
            else:
                delivery.state = DeliveryState.DEAD
                event, outcome = AuditEventType.DELIVERY_DEAD, Outcome.FAILURE
            audit.record(session, audit.Event(
                type=event, actor=self.worker, outcome=outcome, study_uid=row.study_instance_uid, series_uid=row.series_instance_uid, sop_uid=row.sop_instance_uid,
                detail={"delivery_id": delivery.id, "destination": delivery.destination, "attempt": delivery.attempts,
                 "peer_status": None if result.status is None or result.status < 0 else f"0x{result.status:04X}",
                 "error": result.error,
                 "next_attempt_at": delivery.next_attempt_at.isoformat() if event is AuditEventType.DELIVERY_RETRYING else None}))
        level = logging.INFO if result.ok else logging.WARNING
        log.log(level, "delivery %d of %s to %s: %s", row.id, row.sop_instance_uid, row.destination,
                "sent" if result.ok else result.error)


def requeue(db: Database, actor: str, delivery_id: int | None = None, all_dead: bool = False) -> int:
    """Queue dead (or, by id, any unsent) deliveries again; returns how many."""
    with db.session() as session:
        stmt = select(Delivery)
        if delivery_id is not None:
            stmt = stmt.where(Delivery.id == delivery_id, Delivery.state != DeliveryState.SENT)
        elif all_dead:
            stmt = stmt.where(Delivery.state == DeliveryState.DEAD)
        else:
            return 0
        rows = list(session.scalars(stmt))
        for delivery in rows:
            previous = delivery.state
            delivery.state, delivery.attempts, delivery.next_attempt_at = DeliveryState.PENDING, 0, utcnow()
            delivery.claimed_by = delivery.lease_expires_at = None
            output = session.get(Output, delivery.output_id)
            audit.record(session, audit.Event(
                type=AuditEventType.DELIVERY_REQUEUED, actor=actor, outcome=Outcome.SUCCESS, sop_uid=output.sop_instance_uid if output else None,
                detail={"delivery_id": delivery.id, "destination": delivery.destination, "previous_state": previous.value}))
        return len(rows)

