"""Fails when a pynetdicom release changes an internal that GastroLens leans on.

Each internal is used only through ``gastrolens.dicom_io.net.pynetdicom_private``; this
checks that every name it touches still exists and still means what it did, and that
no other GastroLens module reaches into pynetdicom's private names.
"""

from __future__ import annotations

import inspect
import re
import socket
from pathlib import Path

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import STATES, StateMachine
from pynetdicom.transport import AssociationServer, AssociationSocket, ThreadedAssociationServer

import gastrolens
from gastrolens.dicom_io.net import pynetdicom_private

SRC = Path(gastrolens.__file__).parent


def test_ae_keeps_its_servers_in_a_list_that_shutdown_walks():
    ae = AE()
    assert isinstance(ae._servers, list)
    assert "_servers" in inspect.getsource(AE.shutdown)
    assert "self.ae._servers.remove" in inspect.getsource(AssociationServer.shutdown)
    assert "server_class" in inspect.signature(AE.make_server).parameters


def test_association_reaches_its_socket_and_state_through_the_dul():
    assoc = Association(AE(), "acceptor")
    assert isinstance(assoc.dul, DULServiceProvider)
    assert isinstance(assoc.dul.state_machine, StateMachine)
    assert assoc.dul.state_machine.current_state == "Sta1"
    assert assoc.dul.socket is None  # until the server hands it a connection
    assert pynetdicom_private.connection_socket(assoc) is None
    assert "self.socket" in inspect.getsource(AssociationSocket.__init__)


def test_sta13_still_means_awaiting_close():
    assert pynetdicom_private.STATE_AWAITING_CLOSE in STATES
    assert "close" in STATES[pynetdicom_private.STATE_AWAITING_CLOSE].lower()


def test_force_close_wakes_a_blocked_reader():
    left, right = socket.socketpair()
    try:
        assoc = Association(AE(), "acceptor")
        assoc.dul.socket = AssociationSocket(assoc, client_socket=left)
        pynetdicom_private.force_close(assoc)
        assert left.recv(6) == b""  # what pynetdicom's reader sees: the transport closed
    finally:
        left.close()
        right.close()


def test_the_public_rejection_hook_still_works_as_used():
    """EVT_REQUESTED + acse.send_reject: pynetdicom skips its negotiation once is_rejected is set."""
    assert isinstance(evt.EVT_REQUESTED, evt.NotificationEvent)
    run = inspect.getsource(Association.run_reactor)
    assert "EVT_REQUESTED" in run and "is_rejected" in run
    assert "self.assoc.is_rejected = True" in inspect.getsource(ACSE.send_reject)


def test_the_server_hooks_we_override_still_exist():
    for name in ("get_request", "process_request_thread", "server_bind"):
        assert callable(getattr(ThreadedAssociationServer, name))


def test_no_other_module_touches_pynetdicom_private_names():
    private = re.compile(r"\b(?:ae|assoc|acse|dul|server|_config)\._[a-z]\w*")
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "pynetdicom_private.py" or "pynetdicom" not in (text := path.read_text()):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if private.search(line) or "from pynetdicom import _" in line:
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "use gastrolens.dicom_io.net.pynetdicom_private:\n" + "\n".join(offenders)


def test_the_version_these_checks_were_written_against():
    """Not a pin: a reminder to re-read pynetdicom_private.py when the major version moves."""
    assert pynetdicom.__version__.split(".")[0] == "3"


def test_no_delay_turns_nagle_off_on_an_established_association():
    """pynetdicom leaves Nagle on (each C-STORE then waits for the peer's delayed ACK);
    no_delay reaches the socket and sets TCP_NODELAY."""
    from pynetdicom.sop_class import Verification

    from support import free_port

    server_ae = AE(ae_title="PEER")
    server_ae.add_supported_context(Verification)
    port = free_port()
    server = server_ae.start_server(("127.0.0.1", port), block=False)
    client = AE(ae_title="GL")
    client.add_requested_context(Verification)
    try:
        assoc = client.associate("127.0.0.1", port, ae_title="PEER")
        assert assoc.is_established
        sock = pynetdicom_private.connection_socket(assoc)
        assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0, \
            "pynetdicom now sets TCP_NODELAY itself: no_delay may go"
        pynetdicom_private.no_delay(assoc)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assoc.release()
    finally:
        client.shutdown()
        server.shutdown()
    pynetdicom_private.no_delay(Association(AE(), "requestor"))  # no socket yet: nothing to do


def test_a_response_the_reactor_takes_goes_back_to_the_waiting_sender():
    """pynetdicom's reactor can take a C-STORE response meant for send_c_store (its pause
    check reads a stale flag); return_stolen_responses puts it back on the queue
    send_c_store reads; a real request still goes to pynetdicom's handling."""
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    assoc = Association(AE(), "requestor")
    served = []
    assoc._serve_request = lambda msg, context_id: served.append((context_id, msg))
    pynetdicom_private.return_stolen_responses(assoc)
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.Status = 0x0000
    assert not response.is_valid_request
    assoc._serve_request(response, 3)
    assert assoc.dimse.msg_queue.get_nowait() == (3, response) and served == []
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    request.AffectedSOPInstanceUID = "1.2.3"
    request.Priority = 2
    request.DataSet = BytesIO(b"")
    assert request.is_valid_request
    assoc._serve_request(request, 5)
    assert served == [(5, request)] and assoc.dimse.msg_queue.empty()
    assert "self._is_paused = True" in inspect.getsource(Association._run_reactor), \
        "pynetdicom changed its reactor pause: check whether return_stolen_responses is still needed"
