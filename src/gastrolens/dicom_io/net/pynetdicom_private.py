"""Every use GastroLens makes of pynetdicom internals, in one place.

pynetdicom has no public hook for these; each one is named here, with why, and
``tests/dicom_io/net/test_pynetdicom_private.py`` fails when a pynetdicom release
renames or removes what it leans on. Everything else uses the public API (the access
policy, for example, answers ``evt.EVT_REQUESTED`` with ``acse.send_reject``).
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.transport import AssociationServer

STATE_AWAITING_CLOSE = "Sta13"
"""PS3.8 Sta13: A-ABORT or A-ASSOCIATE-RJ sent, waiting for the peer to close."""


def register_server(ae: AE, server: AssociationServer) -> None:
    """Make ``ae`` own a server built with ``ae.make_server`` and started by us.

    ``AE.start_server(block=False)`` cannot take a server class (it always builds a
    ``ThreadedAssociationServer``), and ``server.shutdown()`` / ``ae.shutdown()`` expect
    the server in ``ae._servers``, as ``start_server`` leaves it.
    """
    ae._servers.append(server)  # type: ignore[arg-type]


def connection_socket(assoc: Association) -> socket.socket | None:
    """The connection's socket (plain or TLS), or None once pynetdicom closed it."""
    transport = assoc.dul.socket
    return transport.socket if transport is not None else None


def awaiting_close(assoc: Association) -> bool:
    """True once pynetdicom has sent A-ABORT (or A-ASSOCIATE-RJ) and waits for the peer to close.

    pynetdicom would close on its ARTIM timer, but only while its reader is not blocked
    in ``recv`` on a partial PDU, which is exactly where junk bytes leave it.
    """
    return bool(assoc.dul.state_machine.current_state == STATE_AWAITING_CLOSE)


def force_close(assoc: Association) -> None:
    """Shut the connection down under pynetdicom's feet: its blocked ``recv`` returns,
    its state machine sees the transport close and the association thread ends.

    ``socket.socket.shutdown`` on the file descriptor, not ``SSLSocket.shutdown``,
    which would drop the TLS object while the reader thread still uses it.
    """
    sock = connection_socket(assoc)
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def no_delay(assoc: Association) -> None:
    """Send each PDU as soon as it is written (TCP_NODELAY on the connection).

    pynetdicom leaves Nagle's algorithm on. A C-STORE is a small command PDU and then the
    data PDUs; with Nagle the first data PDU waits for the peer to acknowledge the command,
    and a peer that delays its ACK (Linux: up to 40 ms) stalls every object by that much.
    """
    sock = connection_socket(assoc)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket, or already closed: nothing to speed up


def return_stolen_responses(assoc: Association) -> None:
    """Hand a response the association's reactor takes back to the thread waiting for it.

    ``send_c_store`` pauses the reactor while it waits for its response, but checks the
    pause with a flag the reactor may not have reset yet: right after one response, the
    next request can go out while the reactor, woken by the previous one, is about to read
    the message queue. A fast peer's response (TCP_NODELAY: a millisecond or two) is then
    taken by the reactor, logged as "Received unexpected C-STORE service message" and
    dropped, and the sender waits out the DIMSE timeout (seen: 30 s, then a retry). Our
    sending associations serve no requests, so whatever is not a request goes back on the
    queue the sender reads.
    """
    serve = assoc._serve_request

    def serve_or_return(msg: Any, context_id: int) -> None:
        if msg.is_valid_request:
            serve(msg, context_id)
        else:
            assoc.dimse.msg_queue.put((context_id, msg))

    assoc._serve_request = serve_or_return  # type: ignore[method-assign]


def send_files_as_stored() -> None:
    """Make ``Association.send_c_store(path)`` stream the file's encoded data set as stored.

    pynetdicom documents ``_config.STORE_SEND_CHUNKED_DATASET`` as the way to do this
    (off by default: the file is then decoded with ``dcmread`` and encoded again). Only
    C-STORE requests given a path are affected, and only the sender sends. Process-wide,
    idempotent.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
