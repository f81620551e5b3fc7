"""Junk TCP connections cannot lock the port.

With ``max_associations = 4``, four connections that send an HTTP request (or random
bytes, or zeros, or nothing) and stay open used to hold every slot for as long as the
peer liked: pynetdicom answered A-ABORT but its reader stayed blocked in ``recv``. Now
each is closed at once after the A-ABORT, or after ``acse_timeout_seconds`` when it
says nothing, a real C-ECHO gets through within a few seconds, and each drop is
audited exactly once.
"""

from __future__ import annotations

import random
import socket
import time

import pytest
from sqlalchemy import select

from gastrolens.db.states import AuditEventType
from gastrolens.db.tables import AuditEvent
from support import dcmtk

JUNK = {
    "http request": b"GET / HTTP/1.1\r\nHost: gastrolens\r\nUser-Agent: curl/8\r\n\r\n",
    "1 KiB random": random.Random(7).randbytes(1024),
    "64 KiB zeros": bytes(64 * 1024),
    "silence": b"",
}
SLOTS = 4
ACSE_TIMEOUT = 1.0


def drops(db) -> list[AuditEvent]:
    with db.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.event_type == AuditEventType.ASSOCIATION_REJECTED))
        return [row for row in rows if '"kind":"dropped"' in row.detail]


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed its end (EOF or reset); the socket is non-blocking."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def poll(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("kind", JUNK)
def test_junk_connections_do_not_lock_the_port(make_receiver, kind):
    running = make_receiver(max_associations=SLOTS, acse_timeout_seconds=ACSE_TIMEOUT, network_timeout_seconds=30)
    held = []
    try:
        for _ in range(SLOTS):
            sock = socket.create_connection(("127.0.0.1", running.port))
            if JUNK[kind]:
                sock.sendall(JUNK[kind])
            held.append(sock)
        started = time.monotonic()
        # The peers keep their sockets open and never close them: the server must.
        def echo() -> bool:
            command = ("echoscu", "-to", "2", "-aec", "GASTROLENS", "127.0.0.1", str(running.port))
            return dcmtk(*command).returncode == 0

        assert poll(echo, 3 * ACSE_TIMEOUT + 3), (
            f"C-ECHO still refused {time.monotonic() - started:.1f} s after {kind} peers"
        )
        for sock in held:
            sock.setblocking(False)
        assert poll(lambda: all(closed_by_server(s) for s in held), 2 * ACSE_TIMEOUT + 2)
        assert poll(lambda: len(drops(running.db)) >= SLOTS, 5)
        running.receiver.connections.sweep()
        assert len(drops(running.db)) == SLOTS, "each drop is audited exactly once"
        assert all(d.actor.startswith("dicom:?@127.0.0.1") for d in drops(running.db))
    finally:
        for sock in held:
            sock.close()


def test_a_slow_but_real_peer_is_not_dropped(make_receiver):
    """The watch closes only what has not negotiated: an established association may idle."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    running = make_receiver(max_associations=2, acse_timeout_seconds=ACSE_TIMEOUT)
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="GASTROLENS")
    try:
        assert assoc.is_established
        assert not poll(lambda: not assoc.is_established, 2.5 * ACSE_TIMEOUT)
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
    assert drops(running.db) == []
