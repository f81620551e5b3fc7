"""Delivery: every output goes to each destination, with exponential backoff, then ``dead``.

For each destination the step claims the deliveries that are due and hands them to the
destination's sender: one association carries many objects, and a DICOM peer gets up to
its ``associations`` at once (each carrying every n-th claim, so the oldest still go
first; at least :data:`MIN_PER_ASSOCIATION` objects each), since one association spends
most of its time waiting on the peer. Each association records its results as they come,
:data:`RECORD_GROUP` at a time in one transaction (one attempt and one audit event each),
so a crash re-sends at most that many objects per association (a re-sent object has the
same SOP Instance UID: the peer replaces it). A claim is held for ``lease_seconds``: an
association still sending after half of it stops, releases what it has not sent and
claims again, so a slow peer never outlives the lease it sends under (another worker
would take the same objects). What each result does to the delivery is
:func:`gastrolens.db.transitions_delivery.record_delivery_attempt`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from gastrolens import metrics
from gastrolens.config import Settings
from gastrolens.config.schema import Destination
from gastrolens.daemon.destinations import Outgoing, sender_for
from gastrolens.db import Database
from gastrolens.db.queue import ClaimedDelivery, claim_deliveries, deliveries_due
from gastrolens.db.tables import utcnow
from gastrolens.db.transitions_delivery import (
    RetryPolicy,
    record_delivery_attempts,
    release_deliveries,
    requeue_deliveries,
)
from gastrolens.sending import SendResult, permanent
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)

BATCH = 256
"""The most deliveries one claim (shared by a destination's associations) carries."""
RECORD_GROUP = 8
"""Results recorded in one transaction (one commit, one fsync): the most objects one
association may have sent unrecorded, and so re-send after a crash."""
MIN_PER_ASSOCIATION = 8
"""Fewer objects than this do not open another association (its set-up would cost more than it saves)."""


class DeliveryStep:
    def __init__(self, settings: Settings, db: Database, store: Store, worker: str) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker = worker
        self.destinations = {d.name: d for d in settings.destinations}
        delivery = settings.delivery
        self.policy = RetryPolicy(max_attempts=delivery.max_attempts, backoff_seconds=delivery.backoff_seconds,
                                  max_backoff_seconds=delivery.max_backoff_seconds)

    def run_once(self, now: datetime | None = None) -> int:
        """Attempt every delivery due at ``now`` once; returns how many attempts were made."""
        now = now or utcnow()
        attempts = 0
        with metrics.stage_cpu(metrics.Stage.DELIVER):
            for name, destination in self.destinations.items():
                while True:
                    claims = self._claim(now, destination=name)
                    if not claims:
                        break
                    attempts += self._send_all(destination, claims)
                    if len(claims) < BATCH:
                        break
            orphans = self._claim(now, unknown_to=list(self.destinations))
            gone = (permanent(f"destination {c.destination!r} is no longer configured") for c in orphans)
            attempts += self._deliver(orphans, gone)
        return attempts

    def _send_all(self, destination: Destination, claims: Sequence[ClaimedDelivery]) -> int:
        """Send ``claims`` over up to the destination's ``associations`` at once (each in a
        thread, each claim in one of them); returns how many attempts were recorded."""
        lanes = min(int(getattr(destination, "associations", 1)), math.ceil(len(claims) / MIN_PER_ASSOCIATION))
        if lanes <= 1:
            return self._lane(destination, claims)  # in the calling thread, counted by run_once
        with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix=f"deliver-{destination.name}") as pool:
            futures = [pool.submit(self._counted_lane, destination, claims[lane::lanes]) for lane in range(lanes)]
            return sum(future.result() for future in futures)  # every lane ends (and releases) before a raise

    def _lane(self, destination: Destination, claims: Sequence[ClaimedDelivery]) -> int:
        return self._deliver(claims, sender_for(destination, self.settings).send(self._outgoing(claims)))

    def _counted_lane(self, destination: Destination, claims: Sequence[ClaimedDelivery]) -> int:
        with metrics.stage_cpu(metrics.Stage.DELIVER):  # a lane thread's own CPU (run_once counts its caller's)
            return self._lane(destination, claims)

    def _claim(self, now: datetime, *, destination: str | None = None,
               unknown_to: Sequence[str] | None = None) -> list[ClaimedDelivery]:
        with self.db.read_session() as session:  # an idle tick takes no write lock (receivers commit meanwhile)
            if not deliveries_due(session, now=now, destination=destination, unknown_to=unknown_to):
                return []
        with self.db.session() as session:
            return claim_deliveries(session, self.worker, limit=BATCH,
                                    lease_seconds=self.settings.scheduler.lease_seconds, now=now,
                                    destination=destination, unknown_to=unknown_to)

    def _outgoing(self, claims: Sequence[ClaimedDelivery]) -> list[Outgoing]:
        return [Outgoing(path=self.store.absolute(c.file_path), sop_class_uid=c.sop_class_uid,
                         sop_instance_uid=c.sop_instance_uid, study_instance_uid=c.study_instance_uid,
                         kind=c.output_kind)
                for c in claims]

    def _deliver(self, claims: Sequence[ClaimedDelivery], results: Iterator[SendResult]) -> int:
        """Record the results as they come, :data:`RECORD_GROUP` at a time; claims the
        sender gave no result for are released."""
        done = 0
        group: list[tuple[ClaimedDelivery, SendResult, datetime]] = []
        stop_at = time.monotonic() + self.settings.scheduler.lease_seconds / 2  # well inside the claim's lease
        try:
            try:
                for claim, result in zip(claims, results, strict=False):  # a sender that stops early leaves claims
                    group.append((claim, result, utcnow()))
                    if len(group) >= RECORD_GROUP:
                        full, group = group, []
                        done += self._record(full)
                    if time.monotonic() >= stop_at:
                        log.info("delivery: half the lease spent after %d of %d objects; releasing the rest",
                                 done + len(group), len(claims))
                        break
            finally:
                done += self._record(group)  # the results in hand, even when the sender failed
        finally:
            if done < len(claims):  # unrecorded results (the database failed) are released too: sent again
                with self.db.session() as session:
                    release_deliveries(session, claims[done:], worker=self.worker)
            close = getattr(results, "close", None)
            if close is not None:
                close()  # a generator sender releases its association now
        return done

    def _record(self, group: Sequence[tuple[ClaimedDelivery, SendResult, datetime]]) -> int:
        """Record each attempt of ``group`` (each with its own audit event) in one transaction."""
        if not group:
            return 0
        with self.db.session() as session:
            states = record_delivery_attempts(session, group, worker=self.worker, policy=self.policy)
        for (claim, result, _), state in zip(group, states, strict=True):
            if state is None:
                log.warning("delivery %d of %s: claimed by another worker meanwhile", claim.id,
                            claim.sop_instance_uid)
                continue
            log.log(logging.INFO if result.ok else logging.WARNING, "delivery %d of %s to %s: %s (%s)", claim.id,
                    claim.sop_instance_uid, claim.destination, state.value, result.reason or result.outcome.value)
        return len(group)


def requeue(db: Database, actor: str, delivery_id: int | None = None, all_dead: bool = False) -> int:
    """Queue dead (or, by id, any unsent) deliveries again; returns how many."""
    with db.session() as session:
        return requeue_deliveries(session, actor=actor, now=utcnow(), delivery_id=delivery_id, all_dead=all_dead)
