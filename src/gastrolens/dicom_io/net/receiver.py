"""The C-STORE / C-ECHO service: pynetdicom handlers that persist before they answer.

Flow for one C-STORE: check free space -> inspect the header -> decide the version
(duplicate, new, new version) -> write the bytes as received (atomic, fsync) ->
commit the instance row and its audit event -> answer 0x0000. Anything that cannot
be stored is quarantined with its reason and answered with a failure status.
Handlers never raise: each returns an explicit status.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from gastrolens.config.schema import DicomSettings
from gastrolens.db import Database, audit
from gastrolens.db.instances import plan_version, record_duplicate, record_instance
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.db.tables import Quarantined
from gastrolens.dicom_io.net.inspect import InstanceHeader, inspect_instance
from gastrolens.storage.store import Store
from gastrolens.dicom_io.net.tls import HandshakeInThreadServer, server_context
from gastrolens.errors import DatabaseError, GastroLensError, InvalidInstanceError, StorageError

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
"""Failure: no room on disk, or the database could not commit; the peer may retry."""

# A-ASSOCIATE-RJ (result, source, reason): rejected-permanent, by the service user.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_NO_REASON = (0x01, 0x01, 0x01)


@dataclass(frozen=True)
class AccessPolicy:
    """Who may open an association: calling AE titles and peer networks (empty: anyone)."""

    calling_aets: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_settings(cls, settings: DicomSettings) -> "AccessPolicy":
        return cls(
            frozenset(a.strip() for a in settings.allowed_calling_aets),
            tuple(ipaddress.ip_network(p, strict=False) for p in settings.allowed_peers),
        )

    def refusal(self, calling_ae: str, peer_ip: str) -> tuple[str, tuple[int, int, int]] | None:
        """Why this peer is refused and the A-ASSOCIATE-RJ fields, or None to accept."""
        if self.networks:
            try:
                address = ipaddress.ip_address(peer_ip)
            except ValueError:
                return f"peer address {peer_ip!r} is not an IP address", REJECT_NO_REASON
            if not any(address in net for net in self.networks):
                return f"peer address {peer_ip} is not in dicom.allowed_peers", REJECT_NO_REASON
        if self.calling_aets and calling_ae.strip() not in self.calling_aets:
            return f"calling AE title {calling_ae!r} is not in dicom.allowed_calling_aets", REJECT_CALLING_AE
        return None


class _GatekeeperACSE(ACSE):
    """pynetdicom's ACSE plus the peer-address check pynetdicom has no hook for."""

    def __init__(self, assoc: Association, policy: AccessPolicy) -> None:
        super().__init__(assoc)
        self._policy = policy

    def _negotiate_as_acceptor(self) -> None:
        calling_ae = self.requestor.primitive.calling_ae_title  # type: ignore[union-attr]
        self.requestor.ae_title = calling_ae  # pynetdicom sets it only after its own checks
        refusal = self._policy.refusal(calling_ae, self.assoc.requestor.address)
        if refusal is None:
            super()._negotiate_as_acceptor()
            return
        reason, fields = refusal
        self.assoc.gastrolens_refusal = reason  # type: ignore[attr-defined]
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})  # audited before the peer hears the answer
        self.send_reject(*fields)
        self.assoc.kill()


class Receiver:
    """Owns the pynetdicom AE and its server; ``start()`` binds, ``stop()`` drains."""

    def __init__(self, settings: DicomSettings, store: Store, db: Database,
                 on_stored: Callable[[], None] | None = None) -> None:
        self.on_stored = on_stored
        """Called after each newly stored instance (the scheduler counts toward a full batch)."""
        self.settings = settings
        self.store = store
        self.db = db
        self.policy = AccessPolicy.from_settings(settings)
        self.ae = self._build_ae()
        self._server: ThreadedAssociationServer | None = None
        self._writer = _file_writer(settings)
        self._accepting = threading.Event()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        for sop_class in self.settings.accepted_sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.network_timeout = self.settings.network_timeout_seconds
        ae.acse_timeout = self.settings.network_timeout_seconds
        ae.dimse_timeout = self.settings.network_timeout_seconds
        return ae

    @property
    def listening(self) -> bool:
        return self._server is not None and self._accepting.is_set()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # start_server(block=False) by hand, with a server class that handshakes TLS
        # off the accept loop (see dicom_io.tls).
        server = self.ae.make_server(
            (self.settings.bind, self.settings.port),
            ssl_context=server_context(self.settings.tls),
            evt_handlers=handlers,
            server_class=HandshakeInThreadServer,
        )
        server.handshake_timeout = self.settings.network_timeout_seconds
        server.on_handshake_failure = self._on_tls_failure
        threading.Thread(target=make_target(server.serve_forever), name="gastrolens-acceptor", daemon=True).start()
        self.ae._servers.append(server)  # as start_server does: ae.shutdown() and server.shutdown() expect it
        self._server = server
        self._accepting.set()
        if not self.policy.calling_aets:
            log.warning("dicom.allowed_calling_aets is empty: any calling AE title may store")
        log.info("DICOM receiver %s listening on %s:%d", self.settings.ae_title, self.settings.bind, self.port)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Refuse new associations, let in-flight ones finish (up to ``drain_seconds``), close."""
        if self._server is None:
            return
        self._accepting.clear()
        self._server.shutdown()
        deadline = time.monotonic() + drain_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            log.warning("aborting %d association(s) still open after %.0f s", len(self.ae.active_associations), drain_seconds)
        self.ae.shutdown()
        self._server = None
        self._writer.shutdown(wait=True)
        self._writer = _file_writer(self.settings)

    # -- handlers ----------------------------------------------------------------------

    def _on_connect(self, event: evt.Event) -> None:
        event.assoc.acse = _GatekeeperACSE(event.assoc, self.policy)

    def _on_accepted(self, event: evt.Event) -> None:
        log.info("association accepted from %s (%s)", _actor(event.assoc), event.assoc.requestor.address)

    def _on_rejected(self, event: evt.Event) -> None:
        reason = getattr(event.assoc, "gastrolens_refusal", "pynetdicom rejected it (too many associations?)")
        log.warning("association rejected from %s: %s", _actor(event.assoc), reason)
        self._audit_safely(
            audit.Event(type=AuditEventType.ASSOCIATION_REJECTED, actor=_actor(event.assoc), outcome=Outcome.FAILURE, detail={"reason": reason})
        )

    def _on_tls_failure(self, peer: str, exc: BaseException) -> None:
        self._audit_safely(audit.Event(type=AuditEventType.ASSOCIATION_REJECTED, actor=f"dicom:?@{peer}", outcome=Outcome.FAILURE,
                                       detail={"reason": f"TLS handshake failed: {exc}"}))

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS  # Verification always succeeds while the service runs

    def _on_store(self, event: evt.Event) -> int:
        actor = _actor(event.assoc)
        calling_ae = event.assoc.requestor.ae_title.strip()
        peer = event.assoc.requestor.address
        if not self.store.has_room():
            log.error("refusing C-STORE from %s: less than %d MB free", actor, self.store.min_free_bytes // 2**20)
            self._audit_safely(audit.Event(type=AuditEventType.STORE_REFUSED, actor=actor, outcome=Outcome.FAILURE,
                                           sop_uid=_requested_uid(event), detail={"reason": "storage below min_free_mb"}))
            return STATUS_OUT_OF_RESOURCES
        data = event.encoded_dataset()
        try:
            header = inspect_instance(data, negotiated_sop_class=str(event.context.abstract_syntax))
        except InvalidInstanceError as exc:
            return self._quarantine(data, exc, actor, calling_ae, peer, _requested_uid(event))
        try:
            return self._persist(data, header, actor, calling_ae, peer)
        except (StorageError, DatabaseError) as exc:
            log.error("cannot store %s from %s: %s", header.sop_uid, actor, exc)
            self._audit_safely(audit.Event(type=AuditEventType.STORE_REFUSED, actor=actor, outcome=Outcome.FAILURE, study_uid=header.study_uid,
                                           series_uid=header.series_uid, sop_uid=header.sop_uid, detail={"reason": str(exc)}))
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # a handler must answer; a bug here must not hang the peer
            log.exception("unexpected error storing %s from %s", header.sop_uid, actor)
            self._audit_safely(audit.Event(type=AuditEventType.STORE_REFUSED, actor=actor, outcome=Outcome.FAILURE, study_uid=header.study_uid,
                                           series_uid=header.series_uid, sop_uid=header.sop_uid, detail={"reason": f"internal error: {exc!r}"}))
            return STATUS_OUT_OF_RESOURCES

    def _persist(self, data: bytes, header: InstanceHeader, actor: str, calling_ae: str, peer: str) -> int:
        """Store the bytes and commit the row; the commit comes only after the file is durable.

        The file is written (fsync, rename, folder fsync) on a worker thread while this
        thread prepares the rows in the open transaction: the disk waits and the
        database work overlap instead of adding up.
        """
        written = None
        try:
            with self.db.session() as session:
                plan = plan_version(session, header)
                if plan.is_duplicate:
                    record_duplicate(session, header, plan, actor)
                    log.info("duplicate %s from %s: nothing stored", header.sop_uid, actor)
                    return STATUS_SUCCESS
                relative = self.store.instance_path(header.study_uid, header.series_uid, header.sop_uid, plan.version)
                writing = self._writer.submit(self.store.write, relative, data)
                try:
                    record_instance(session, header, plan, relative, calling_ae=calling_ae, peer_address=peer, actor=actor)
                finally:
                    written = writing.result()  # a failed write raises here: the transaction rolls back
        except BaseException:
            if written is not None:
                written.unlink(missing_ok=True)
            raise
        log.debug("stored %s (%d bytes) from %s", header.sop_uid, header.size_bytes, actor)
        if self.on_stored is not None:
            self.on_stored()
        return STATUS_SUCCESS

    def _quarantine(self, data: bytes, exc: InvalidInstanceError, actor: str, calling_ae: str, peer: str, sop_uid: str | None) -> int:
        log.warning("quarantining instance %s from %s: %s (status 0x%04X)", sop_uid, actor, exc.reason, exc.status)
        context = {"calling_ae": calling_ae, "peer_address": peer, "sop_instance_uid": sop_uid, "status": f"0x{exc.status:04X}"}
        try:
            relative = self.store.quarantine(data, exc.reason, context)
            with self.db.session() as session:
                session.add(Quarantined(file_path=relative, reason=exc.reason, status=exc.status, sop_instance_uid=sop_uid,
                                        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                                        calling_ae=calling_ae, peer_address=peer))
                audit.record(session, audit.Event(type=AuditEventType.INSTANCE_QUARANTINED, actor=actor, outcome=Outcome.FAILURE,
                                                  sop_uid=sop_uid, detail={"reason": exc.reason, "path": relative,
                                                                           "status": f"0x{exc.status:04X}"}))
        except GastroLensError as err:
            log.error("could not record quarantined instance %s: %s", sop_uid, err)
            return STATUS_OUT_OF_RESOURCES
        return exc.status

    def _audit_safely(self, event: audit.Event) -> None:
        try:
            with self.db.session() as session:
                audit.record(session, event)
        except GastroLensError as exc:
            log.error("could not write audit event %s: %s", event.type.value, exc)


def _file_writer(settings: DicomSettings) -> ThreadPoolExecutor:
    """Threads that write received files, one per possible association (created on demand)."""
    return ThreadPoolExecutor(max_workers=settings.max_associations, thread_name_prefix="gastrolens-store")


def _actor(assoc: Association) -> str:
    return f"dicom:{assoc.requestor.ae_title.strip()}@{assoc.requestor.address}"


def _requested_uid(event: evt.Event) -> str | None:
    uid = getattr(event.request, "AffectedSOPInstanceUID", None)
    return str(uid) if uid else None
