"""DICOM TLS: the receiver's SSL context, a server that handshakes safely, and the client side.

pynetdicom's ``AssociationServer.get_request`` performs the TLS handshake in its accept
loop, on a blocking socket: one peer that opens a TCP connection and sends nothing
stops every other association, and a failed handshake is dropped without a word.
:class:`HandshakeInThreadServer` accepts at once and runs the handshake in the
connection's own thread, bounded by a timeout, reporting each failure to a callback.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable

from pynetdicom.transport import ThreadedAssociationServer

from gastrolens.config.schema import DestinationTLS, TLSSettings

log = logging.getLogger(__name__)

HandshakeFailure = Callable[[str, BaseException], None]
"""Called with the peer address and the error when a TLS handshake fails."""


def server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The receiver's SSL context, or None when TLS is off.

    With ``tls.ca`` set, peers must present a client certificate signed by that CA.
    """
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: DestinationTLS) -> ssl.SSLContext | None:
    """The SSL context for an association GastroLens opens (delivery, C-MOVE, storage
    commitment report) to a peer with this ``tls`` table; None when its TLS is off.

    The peer's certificate is checked against ``tls.ca`` (else the system CAs), not its
    host name: PACS certificates rarely name the host the way DICOM peers are configured.
    With ``cert`` and ``key`` set, GastroLens presents its client certificate.
    """
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    ctx.check_hostname = False
    if tls.cert and tls.key:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def client_tls_args(tls: DestinationTLS, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for :meth:`AE.associate` to ``host``; None without TLS."""
    ctx = client_context(tls)
    return (ctx, host) if ctx is not None else None


class HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the TLS handshake off the accept loop.

    Set ``handshake_timeout``, ``connection_timeout`` (seconds) and ``on_handshake_failure``
    after construction. Every connection's socket gets ``connection_timeout``: a peer that
    stalls in the middle of a PDU is dropped after that long instead of holding its
    thread and its association slot forever (accepted sockets have no timeout otherwise).
    """

    handshake_timeout: float = 30.0
    connection_timeout: float | None = None
    on_handshake_failure: HandshakeFailure | None = None
    on_connection_failed: Callable[[], None] | None = None
    """Called when a connection ends before pynetdicom sees it (a failed handshake)."""
    handoff: bool = False
    """True: the server neither binds nor listens; connections accepted elsewhere (another
    process) are handed to it with ``process_request`` (see ``gastrolens.daemon.receivers``)."""

    def server_bind(self) -> None:
        if not self.handoff:
            super().server_bind()

    def server_activate(self) -> None:
        if not self.handoff:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()  # no handshake here: see process_request_thread

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        if self.ssl_context is not None:
            try:
                request.settimeout(self.handshake_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError, timeouts and resets are OSErrors
                self._handshake_failed(request, client_address, exc)
                if self.on_connection_failed is not None:
                    self.on_connection_failed()
                return
        request.settimeout(self.connection_timeout)
        super().process_request_thread(request, client_address)

    def _handshake_failed(self, request: socket.socket, client_address: tuple[str, int], exc: BaseException) -> None:
        peer = str(client_address[0])
        try:
            request.close()
        except OSError:
            pass
        if isinstance(exc, (ssl.SSLEOFError, ConnectionError)):
            # A port probe or a peer that gave up: worth a line, not an audit event.
            log.info("TLS connection from %s closed before the handshake finished: %s", peer, exc)
            return
        log.warning("TLS handshake with %s failed: %s", peer, exc)
        if self.on_handshake_failure is not None:
            self.on_handshake_failure(peer, exc)


class HandoffServer(HandshakeInThreadServer):
    """A server for connections accepted by another process and handed over."""

    handoff = True
