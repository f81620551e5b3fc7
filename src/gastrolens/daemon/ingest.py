"""What happens to a received data set: the receiver's :class:`Ingest`, wired to store and database.

One C-STORE: check free space -> write the bytes as received to a staging file and
fsync it (on a writer thread, while this one inspects the header) -> in one database
transaction: decide the version (duplicate, new, new version), rename the staged file
into place once its fsync is done and fsync its folder (on a writer thread, while this
one inserts the rows), commit the instance row and its audit event -> answer 0x0000. The peer hears
success only after the file is durable under its final name and the row is committed.
Anything that cannot be stored is quarantined with its reason and audited, and
answered with a failure status.

The data fsync starts as soon as the bytes are in and overlaps the header inspection
and then the inserts, so one association waits for little more than the commit; on
SQLite, ``write_lock`` (one lock shared by every receiver process) queues writers
promptly instead of leaving them to SQLite's sleeping busy handler.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from gastrolens import metrics
from gastrolens.db import Database, audit
from gastrolens.db.instances import plan_version, record_duplicate, record_instance
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.db.tables import Quarantined
from gastrolens.dicom_io.net.inspect import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DOES_NOT_MATCH_SOP_CLASS,
    InstanceHeader,
    inspect_instance,
)
from gastrolens.dicom_io.net.received import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    IngestOutcome,
    IngestResult,
    PeerEvent,
    ReceivedInstance,
    RequestFacts,
)
from gastrolens.errors import DatabaseError, GastroLensError, InvalidInstanceError, StorageError
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (OSError, MemoryError, StorageError, DatabaseError)
"""Unforeseen errors the peer may retry past (0xA700); any other one is 0xC000."""


class DatabaseIngest:
    """Persists received instances in ``store`` and records them in ``db``.

    ``writers`` threads write files while the receiving thread prepares the rows in the
    open transaction, so the disk wait and the database work overlap.
    """

    def __init__(
        self,
        store: Store,
        db: Database,
        *,
        writers: int = 4,
        on_stored: Callable[[], None] | None = None,
        write_lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.store = store
        self.db = db
        self.on_stored = on_stored
        """Called after each newly stored instance (the scheduler counts toward a full batch)."""
        self._write_lock: AbstractContextManager[Any] = write_lock if write_lock is not None else nullcontext()
        self._writer = ThreadPoolExecutor(max_workers=2 * writers, thread_name_prefix="gastrolens-store")

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    # -- Ingest ------------------------------------------------------------------------

    def ingest(self, received: ReceivedInstance) -> IngestOutcome:
        facts = _facts(received)
        try:
            room = self.store.has_room()
        except OSError as exc:
            return self._refuse(facts, None, f"cannot check free space: {exc}")
        if not room:
            log.error(
                "refusing C-STORE from %s: less than %d MB free", received.actor, self.store.min_free_bytes // 2**20
            )
            return self._refuse(facts, None, "storage below min_free_mb")
        staging = self._writer.submit(_counted, self.store.stage, received.data)
        try:
            try:
                header = inspect_instance(received.data, negotiated_sop_class=received.negotiated_sop_class)
            except InvalidInstanceError as exc:
                return self._quarantine(received.data, facts, exc.reason, exc.status)
            unwanted = _unwanted(received, header)
            if unwanted is not None:
                return self._quarantine(received.data, facts, *unwanted, header)
            try:
                return self._persist(received, header, staging)
            except InvalidInstanceError as exc:  # contradicts what is stored (e.g. a series under another study)
                return self._quarantine(received.data, facts, exc.reason, exc.status, header)
            except (StorageError, DatabaseError) as exc:
                log.error("cannot store %s from %s: %s", header.sop_uid, received.actor, exc)
                return self._refuse(facts, header, str(exc))
        finally:
            _discard_if_unplaced(self.store, staging)

    def last_resort(
        self, received: ReceivedInstance | None, requested: RequestFacts, error: BaseException
    ) -> IngestOutcome:
        status = STATUS_OUT_OF_RESOURCES if isinstance(error, TRANSIENT_ERRORS) else STATUS_CANNOT_UNDERSTAND
        reason = f"internal error: {error.__class__.__name__}: {error}"
        try:
            if received is not None:
                return self._quarantine(received.data, requested, reason, status)
            return self._refuse(requested, None, reason, status=status)
        except Exception:  # the guard's guard: answer no matter what
            log.exception("could not record the failure of a C-STORE from %s", requested.actor)
            return IngestOutcome(status=status, result=IngestResult.REFUSED, reason=reason)

    def peer_event(self, event: PeerEvent) -> None:
        self._audit_safely(
            audit.Event(
                type=AuditEventType.ASSOCIATION_REJECTED,
                actor=event.actor,
                outcome=Outcome.FAILURE,
                detail={"reason": event.reason, "kind": event.kind.value},
            )
        )

    # -- steps -------------------------------------------------------------------------

    def _persist(self, received: ReceivedInstance, header: InstanceHeader, staging: Future[Path]) -> IngestOutcome:
        """Place the staged bytes and commit the row; the commit comes only after the file is durable."""
        placed: Path | None = None
        try:
            with self._write_lock, self.db.session() as session:
                plan = plan_version(session, header)
                if plan.is_duplicate:
                    record_duplicate(session, header, plan, received.actor)
                    log.info("duplicate %s from %s: nothing stored", header.sop_uid, received.actor)
                    return IngestOutcome(status=STATUS_SUCCESS, result=IngestResult.DUPLICATE, **_uids(header))
                relative = self.store.instance_path(header.study_uid, header.series_uid, header.sop_uid, plan.version)
                # The rest of the data fsync, the rename and the folder fsync overlap the inserts.
                placing = self._writer.submit(_counted, _place_when_staged, self.store, staging, relative)
                try:
                    record_instance(
                        session,
                        header,
                        plan,
                        relative,
                        calling_ae=received.calling_ae,
                        peer_address=received.peer_address,
                        actor=received.actor,
                    )
                finally:
                    placed = placing.result()  # a failed rename raises here: the transaction rolls back
        except BaseException:
            if placed is not None:
                placed.unlink(missing_ok=True)
            raise
        log.debug("stored %s (%d bytes) from %s", header.sop_uid, header.size_bytes, received.actor)
        if self.on_stored is not None:
            self.on_stored()
        return IngestOutcome(status=STATUS_SUCCESS, result=IngestResult.STORED, **_uids(header))

    def _quarantine(
        self, data: bytes, facts: RequestFacts, reason: str, status: int, header: InstanceHeader | None = None
    ) -> IngestOutcome:
        sop_uid = header.sop_uid if header else facts.requested_sop_uid
        log.warning("quarantining instance %s from %s: %s (status 0x%04X)", sop_uid, facts.actor, reason, status)
        context = {
            "calling_ae": facts.calling_ae,
            "peer_address": facts.peer_address,
            "sop_instance_uid": sop_uid,
            "status": f"0x{status:04X}",
        }
        try:
            relative = self.store.quarantine(data, reason, context)
            with self._write_lock, self.db.session() as session:
                session.add(
                    Quarantined(
                        file_path=relative,
                        reason=reason,
                        status=status,
                        sop_instance_uid=sop_uid,
                        sha256=hashlib.sha256(data).hexdigest(),
                        size_bytes=len(data),
                        calling_ae=facts.calling_ae,
                        peer_address=facts.peer_address,
                    )
                )
                audit.record(
                    session,
                    audit.Event(
                        type=AuditEventType.INSTANCE_QUARANTINED,
                        actor=facts.actor,
                        outcome=Outcome.FAILURE,
                        study_uid=header.study_uid if header else None,
                        series_uid=header.series_uid if header else None,
                        sop_uid=sop_uid,
                        detail={"reason": reason, "path": relative, "status": f"0x{status:04X}"},
                    ),
                )
        except GastroLensError as err:
            log.error("could not record quarantined instance %s: %s", sop_uid, err)
            return IngestOutcome(
                status=STATUS_OUT_OF_RESOURCES, result=IngestResult.REFUSED, reason=str(err), **_uids(header)
            )
        return IngestOutcome(status=status, result=IngestResult.QUARANTINED, reason=reason, **_uids(header))

    def _refuse(
        self, facts: RequestFacts, header: InstanceHeader | None, reason: str, status: int = STATUS_OUT_OF_RESOURCES
    ) -> IngestOutcome:
        self._audit_safely(
            audit.Event(
                type=AuditEventType.STORE_REFUSED,
                actor=facts.actor,
                outcome=Outcome.FAILURE,
                study_uid=header.study_uid if header else None,
                series_uid=header.series_uid if header else None,
                sop_uid=header.sop_uid if header else facts.requested_sop_uid,
                detail={"reason": reason, "status": f"0x{status:04X}"},
            )
        )
        return IngestOutcome(status=status, result=IngestResult.REFUSED, reason=reason, **_uids(header))

    def _audit_safely(self, event: audit.Event) -> None:
        try:
            with self._write_lock, self.db.session() as session:
                audit.record(session, event)
        except GastroLensError as exc:
            log.error("could not write audit event %s: %s", event.type.value, exc)


def _counted(work: Callable[..., Path], *args: Any) -> Path:
    """File work on a writer thread, its CPU time counted toward receiving."""
    with metrics.stage_cpu(metrics.Stage.RECEIVE):
        return work(*args)


def _place_when_staged(store: Store, staging: Future[Path], relative: str) -> Path:
    return store.place(staging.result(), relative)  # a failed staging write raises here


def _discard_if_unplaced(store: Store, staging: Future[Path]) -> None:
    """Remove the staged file unless it was renamed into place (quarantine, refusal, duplicate)."""
    try:
        staged = staging.result()
    except Exception:  # the staging write failed: nothing to remove
        return
    store.discard(staged)


def _unwanted(received: ReceivedInstance, header: InstanceHeader) -> tuple[str, int] | None:
    """Why a well-formed data set is not what its sender may store here (STOW-RS checks), or None."""
    expected = received.expected_study_uid
    if expected is not None and header.study_uid != expected:
        reason = f"Study Instance UID {header.study_uid} is not the study {expected} the request addressed"
        return reason, STATUS_DOES_NOT_MATCH_SOP_CLASS
    accepted = received.accepted_sop_classes
    if accepted is not None and header.sop_class_uid not in accepted:
        reason = f"SOP Class UID {header.sop_class_uid} is not in dicom.accepted_sop_classes"
        return reason, STATUS_SOP_CLASS_NOT_SUPPORTED
    return None


def _uids(header: InstanceHeader | None) -> dict[str, str]:
    """The outcome's naming of the data set, when its header was read."""
    if header is None:
        return {}
    return {"sop_class_uid": header.sop_class_uid, "sop_instance_uid": header.sop_uid,
            "study_uid": header.study_uid, "series_uid": header.series_uid}


def _facts(received: ReceivedInstance) -> RequestFacts:
    return RequestFacts(
        actor=received.actor,
        calling_ae=received.calling_ae,
        peer_address=received.peer_address,
        requested_sop_uid=received.requested_sop_uid,
    )
