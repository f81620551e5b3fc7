"""The DICOM service: pynetdicom handlers that answer only after the ingest side has persisted.

For one C-STORE the receiver takes the bytes as received, hands them to its
:class:`~gastrolens.dicom_io.net.received.Ingest` (the daemon's stores them durably
and records them, see ``gastrolens.daemon.ingest``) and answers the status it gets
back. It imports nothing from the database. Handlers never raise: every path answers
a status of ours and is audited, through a last-resort guard for what nobody foresaw.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.utils import make_target

from gastrolens import metrics
from gastrolens.config.schema import DicomSettings
from gastrolens.dicom_io.net import pynetdicom_private
from gastrolens.dicom_io.net.connections import ConnectionWatch
from gastrolens.dicom_io.net.query_retrieve import QueryRetrieve
from gastrolens.dicom_io.net.received import (
    STATUS_SUCCESS,
    Ingest,
    PeerEvent,
    PeerEventKind,
    ReceivedInstance,
    RequestFacts,
)
from gastrolens.dicom_io.net.services import DicomService
from gastrolens.dicom_io.net.tls import HandoffServer, HandshakeInThreadServer, server_context

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, reason): rejected-permanent, by the service user.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_NO_REASON = (0x01, 0x01, 0x01)
# Rejected-transient by the service provider (presentation): local limit exceeded.
REJECT_BUSY = (0x02, 0x03, 0x02)


class SharedCount(Protocol):
    """A counter shared between processes (``multiprocessing.Value("i")``)."""

    value: int

    def get_lock(self) -> Any: ...


@dataclass(frozen=True)
class AccessPolicy:
    """Who may open an association: calling AE titles and peer networks (empty: anyone)."""

    calling_aets: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_settings(cls, settings: DicomSettings) -> AccessPolicy:
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


def warn_if_open(settings: DicomSettings) -> None:
    """Say once per node that any calling AE title may store (no allow list configured)."""
    if not settings.allowed_calling_aets:
        log.warning("dicom.allowed_calling_aets is empty: any calling AE title may store")


class Receiver:
    """Owns the pynetdicom AE and its server; ``start()`` binds, ``stop()`` drains.

    ``handoff``: listen nowhere; serve the connections another process accepted and
    hands over with :meth:`serve_connection` (several receiver processes behind one
    port, see ``gastrolens.daemon.receivers``). ``node_associations``: the count of
    negotiated associations shared by those processes, which keeps
    ``max_associations`` a limit for the whole node. ``on_connection_end``: called once
    per connection when it is over, whatever happened.
    """

    def __init__(
        self,
        settings: DicomSettings,
        ingest: Ingest,
        *,
        handoff: bool = False,
        node_associations: SharedCount | None = None,
        on_connection_end: Callable[[], None] | None = None,
        services: Sequence[DicomService] = (),
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.services = tuple(services)
        self._storable = frozenset(settings.accepted_sop_classes)
        self.handoff = handoff
        self.on_connection_end = on_connection_end
        self.node_associations = node_associations
        self._counted: set[int] = set()
        self.policy = AccessPolicy.from_settings(settings)
        self.ae = self._build_ae()
        self.connections = ConnectionWatch(
            acse_timeout=settings.acse_timeout_seconds, on_drop=self._on_dropped, on_end=self._on_ended
        )
        self._server: HandshakeInThreadServer | None = None
        self._accepting = threading.Event()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        for sop_class in self.settings.accepted_sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        for service in self.services:  # storage commitment, MPPS...: see dicom_io.net.services
            for sop_class in service.sop_classes:
                ae.add_supported_context(sop_class)
            if isinstance(service, QueryRetrieve):  # C-GET sends back on storage contexts (role selection)
                service.add_storage_roles(ae)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu_bytes
        ae.network_timeout = self.settings.network_timeout_seconds
        ae.acse_timeout = self.settings.acse_timeout_seconds
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
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        handlers += [handler for service in self.services for handler in service.handlers()]
        # start_server(block=False) by hand, with a server class that handshakes TLS
        # off the accept loop and bounds every connection (see dicom_io.net.tls).
        server = cast(
            HandshakeInThreadServer,
            self.ae.make_server(
                (self.settings.bind, self.settings.port),
                ssl_context=server_context(self.settings.tls),
                evt_handlers=handlers,
                server_class=HandoffServer if self.handoff else HandshakeInThreadServer,
            ),
        )
        server.handshake_timeout = self.settings.network_timeout_seconds
        server.connection_timeout = self.settings.network_timeout_seconds
        server.on_handshake_failure = self._on_tls_failure
        server.on_connection_failed = self.on_connection_end
        self.connections.start()
        if not self.handoff:
            threading.Thread(target=make_target(server.serve_forever), name="gastrolens-acceptor", daemon=True).start()
            pynetdicom_private.register_server(self.ae, server)
        self._server = server
        self._accepting.set()
        if not self.handoff:  # (the receiver processes' pool says both once for all of them)
            warn_if_open(self.settings)
            log.info("DICOM receiver %s listening on %s:%d", self.settings.ae_title, self.settings.bind, self.port)

    def serve_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Serve a connection accepted elsewhere (``handoff`` mode), in a thread of its own."""
        if self._server is None or not self._accepting.is_set():
            sock.close()
            if self.on_connection_end is not None:
                self.on_connection_end()
            return
        self._server.process_request(sock, address)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Refuse new associations, let in-flight ones finish (up to ``drain_seconds``), close."""
        if self._server is None:
            return
        self._accepting.clear()
        if not self.handoff:
            self._server.shutdown()
        deadline = time.monotonic() + drain_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            log.warning(
                "aborting %d association(s) still open after %.0f s", len(self.ae.active_associations), drain_seconds
            )
        self.ae.shutdown()
        for service in self.services:
            service.close()
        if self.handoff:
            self._server.server_close()
        self.connections.stop()
        self._server = None

    # -- association handlers ----------------------------------------------------------

    def _on_connect(self, event: evt.Event) -> None:
        self.connections.opened(event.assoc)
        pynetdicom_private.no_delay(event.assoc)  # each response leaves at once, not after the peer's delayed ACK

    def _on_requested(self, event: evt.Event) -> None:
        """The access policy, applied before pynetdicom negotiates (public hook: EVT_REQUESTED)."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling_ae = str(primitive.calling_ae_title) if primitive is not None else ""
        refusal = self.policy.refusal(calling_ae, assoc.requestor.address) or self._node_full(assoc)
        if refusal is None:
            return
        reason, fields = refusal
        actor = f"dicom:{calling_ae.strip()}@{assoc.requestor.address}"
        log.warning("association rejected from %s: %s", actor, reason)
        self.connections.rejected(assoc)
        self.ingest.peer_event(
            PeerEvent(kind=PeerEventKind.REJECTED, actor=actor, reason=reason)
        )  # before the peer hears
        assoc.acse.send_reject(*fields)
        assoc.kill()  # waits until the A-ASSOCIATE-RJ is out, as pynetdicom's own rejection does

    def _node_full(self, assoc: Association) -> tuple[str, tuple[int, int, int]] | None:
        """Count this association toward the node's limit, or say why it is refused."""
        shared = self.node_associations
        if shared is None:
            return None
        with shared.get_lock():
            if shared.value >= self.settings.max_associations:
                return (
                    f"dicom.max_associations ({self.settings.max_associations}) reached across receiver processes",
                    REJECT_BUSY,
                )
            shared.value += 1
        self._counted.add(id(assoc))
        return None

    def _on_ended(self, assoc: Association) -> None:
        if self.on_connection_end is not None:
            self.on_connection_end()
        if self.node_associations is not None and id(assoc) in self._counted:
            self._counted.discard(id(assoc))
            with self.node_associations.get_lock():
                self.node_associations.value -= 1

    def _on_accepted(self, event: evt.Event) -> None:
        self.connections.accepted(event.assoc)
        log.info("association accepted from %s (%s)", _actor(event.assoc), event.assoc.requestor.address)

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (too many associations, no acceptable context...)."""
        self.connections.rejected(event.assoc)
        reason = "pynetdicom rejected it (too many associations?)"
        log.warning("association rejected from %s: %s", _actor(event.assoc), reason)
        self.ingest.peer_event(PeerEvent(kind=PeerEventKind.REJECTED, actor=_actor(event.assoc), reason=reason))

    def _on_dropped(self, assoc: Association, reason: str) -> None:
        log.warning("connection from %s dropped: %s", assoc.requestor.address, reason)
        self.ingest.peer_event(
            PeerEvent(kind=PeerEventKind.DROPPED, actor=f"dicom:?@{assoc.requestor.address}", reason=reason)
        )

    def _on_tls_failure(self, peer: str, exc: BaseException) -> None:
        self.ingest.peer_event(
            PeerEvent(kind=PeerEventKind.TLS_FAILED, actor=f"dicom:?@{peer}", reason=f"TLS handshake failed: {exc}")
        )

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS  # Verification always succeeds while the service runs

    # -- C-STORE -----------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int:
        with metrics.stage_cpu(metrics.Stage.RECEIVE):
            received: ReceivedInstance | None = None
            facts = RequestFacts(actor="dicom:?", calling_ae="", peer_address="", requested_sop_uid=None)
            try:
                facts = _request_facts(event)
                received = ReceivedInstance(
                    data=event.encoded_dataset(),
                    actor=facts.actor,
                    calling_ae=facts.calling_ae,
                    peer_address=facts.peer_address,
                    negotiated_sop_class=str(event.context.abstract_syntax),
                    requested_sop_uid=facts.requested_sop_uid,
                    accepted_sop_classes=self._storable,  # output classes are negotiated for C-GET only
                )
                return self.ingest.ingest(received).status
            except Exception as exc:  # the last-resort guard: answer and audit, never raise
                log.exception("unexpected error handling a C-STORE from %s", facts.actor)
                return self.ingest.last_resort(received, facts, exc).status


def _actor(assoc: Association) -> str:
    return f"dicom:{assoc.requestor.ae_title.strip()}@{assoc.requestor.address}"


def _request_facts(event: evt.Event) -> RequestFacts:
    uid = getattr(event.request, "AffectedSOPInstanceUID", None)
    return RequestFacts(
        actor=_actor(event.assoc),
        calling_ae=event.assoc.requestor.ae_title.strip(),
        peer_address=event.assoc.requestor.address,
        requested_sop_uid=str(uid) if uid else None,
    )
