"""Several receiver processes on one port, so that ingest grows with cores.

pynetdicom decodes PDUs and runs handlers in Python threads: in one process every
association shares one GIL. :class:`ReceiverPool` starts ``dicom.receiver_processes``
processes (spawned, named ``gl-receiver`` in ``/proc/<pid>/comm``), each with its own
pynetdicom AE and server, its own database engine and its own
:class:`~gastrolens.daemon.ingest.DatabaseIngest`. The daemon owns the listening
socket: it accepts each connection and hands it (SCM_RIGHTS over a Unix socket) to the
process serving the fewest connections, so two associations always land on two
processes (SO_REUSEPORT would hash them, and half the time onto the same one). TLS is
negotiated in the receiver process. What holds across processes:

- durability: each process persists exactly as one does (fsync + rename, then row and
  audit event committed, then 0x0000);
- one audit chain, one writer at a time: ``db.audit`` serialises appends (PostgreSQL
  advisory lock, SQLite ``BEGIN IMMEDIATE``), whichever process writes;
- ``dicom.max_associations`` is a whole-node limit: negotiated associations are
  counted in shared memory and refused (A-ASSOCIATE-RJ, transient, local limit
  exceeded) beyond it; connections that never negotiate are bounded by
  ``acse_timeout_seconds`` in each process;
- the processes die with the daemon (PR_SET_PDEATHSIG) and drain on SIGTERM;
- a process that dies on its own (a crash, the OOM killer) is started again, after
  :data:`RESTART_DELAY_SECONDS`; its slots in the node-wide association count are freed,
  so a crash cannot leak the node's capacity.

The daemon hears of each stored instance (to wake inference on a full batch) and of
the receivers' CPU time (metrics, stage ``receive``) through one pipe per process.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

from gastrolens import logsetup, metrics
from gastrolens.config.schema import DicomSettings
from gastrolens.dicom_io.net.receiver import warn_if_open

log = logging.getLogger(__name__)

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PROCESS_NAME = "gl-receiver"
MAX_PROCESSES = 8
READY, STORED, CPU, FAILED = "ready", "stored", "cpu", "failed"
RESTART_DELAY_SECONDS = 1.0


def process_count(settings: DicomSettings) -> int:
    """``dicom.receiver_processes``, or one per CPU, at most :data:`MAX_PROCESSES`."""
    if settings.receiver_processes is not None:
        return settings.receiver_processes
    return max(1, min(os.cpu_count() or 1, MAX_PROCESSES))


class ReceiverPool:
    """``count`` receiver processes behind ``settings.dicom.port`` (0: a free port, chosen here)."""

    def __init__(
        self, settings: Any, count: int, *, on_stored: Callable[[], None] | None = None, log_level: int = logging.INFO
    ) -> None:
        self.settings = settings
        self.count = count
        self.on_stored = on_stored
        self.log_level = log_level
        self._processes: list[SpawnProcess] = []
        self._pipes: list[Connection] = []
        self._channels: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._port = 0
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        context = multiprocessing.get_context("spawn")
        self._associations: SynchronizedArray[int] = context.Array("i", count)
        """Negotiated associations, one slot per process (see :class:`NodeCount`)."""
        self._write_lock = context.Lock()
        """SQLite: one writer at a time across the processes, woken promptly (see daemon.ingest)."""
        self._finished: SynchronizedArray[int] = context.Array("q", count)
        """Connections each process has finished with (it counts; the daemon only reads)."""
        self._handed = [0] * count
        self.restarts = 0
        """Receiver processes started again after dying on their own."""

    @property
    def port(self) -> int:
        return self._port

    @property
    def write_lock(self) -> Any:
        """The processes' shared SQLite write lock, for another ingest in the daemon (STOW-RS)."""
        return self._write_lock

    @property
    def listening(self) -> bool:
        return self._listener is not None and bool(self._processes) and all(p.is_alive() for p in self._processes)

    def loads(self) -> list[int]:
        """Connections each receiver process is serving now (handed over, not yet finished)."""
        return [self._handed[i] - self._finished[i] for i in range(self.count)]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def start(self, timeout: float = 120.0) -> None:
        dicom: DicomSettings = self.settings.dicom
        for index in range(self.count):
            process, pipe, channel = self._spawn(index)
            self._processes.append(process)
            self._pipes.append(pipe)
            self._channels.append(channel)
        deadline = time.monotonic() + timeout
        for index, pipe in enumerate(self._pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                self.stop(drain_seconds=0)
                raise RuntimeError(f"receiver process {index} did not start within {timeout:.0f} s")
            try:
                message = pipe.recv()
            except EOFError:
                message = (FAILED, f"exited with code {self._processes[index].exitcode}")
            if message[0] != READY:
                self.stop(drain_seconds=0)
                raise RuntimeError(f"receiver process {index} failed to start: {message[1]}")
        try:
            self._listener = _listen(dicom.bind, dicom.port)
        except OSError:
            self.stop(drain_seconds=0)
            raise
        self._port = int(self._listener.getsockname()[1])
        self._threads = [
            threading.Thread(target=self._read, name="gastrolens-receivers", daemon=True),
            threading.Thread(target=self._accept, name="gastrolens-acceptor", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        warn_if_open(dicom)
        log.info("%d receiver processes serving %s:%d", self.count, dicom.bind, self._port)

    def _spawn(self, index: int) -> tuple[SpawnProcess, Connection, socket.socket]:
        """Start receiver process ``index``: returns it, its report pipe and its hand-over channel."""
        context = multiprocessing.get_context("spawn")
        # Only what a receiver needs (secrets such as API tokens stay in the daemon).
        payload = {
            section: getattr(self.settings, section).model_dump(mode="json")
            for section in ("dicom", "storage", "database")
        }
        parent_end, child_end = context.Pipe(duplex=False)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = context.Process(
            target=_serve,
            name=f"{PROCESS_NAME}-{index}",
            daemon=True,
            args=(
                payload,
                index,
                child_end,
                theirs,
                self._associations,
                self._finished,
                self._write_lock,
                self.log_level,
                os.getpid(),
            ),
        )
        process.start()
        child_end.close()
        theirs.close()
        return process, parent_end, ours

    def _restart(self, index: int) -> Connection | None:
        """Start process ``index`` again after it died on its own; returns its new pipe."""
        dead = self._processes[index]
        dead.join(5)
        with self._associations.get_lock():
            self._associations[index] = 0  # what it held died with it
        self._handed[index] = self._finished[index]  # its connections are gone too
        log.error(
            "receiver process %d (pid %s) ended unexpectedly with exit code %s: starting it again in %.0f s",
            index, dead.pid, dead.exitcode, RESTART_DELAY_SECONDS,
        )
        if self._stopping.wait(RESTART_DELAY_SECONDS):
            return None
        process, pipe, channel = self._spawn(index)
        old_channel = self._channels[index]
        self._processes[index], self._pipes[index], self._channels[index] = process, pipe, channel
        old_channel.close()
        self.restarts += 1
        return pipe

    def stop(self, drain_seconds: float = 30.0) -> list[int | None]:
        """Stop accepting, then SIGTERM each process (it drains its associations) and wait for it.

        Returns the processes' exit codes (0: drained and exited cleanly).
        """
        self._stopping.set()
        for thread in self._threads:
            if thread.name == "gastrolens-acceptor":
                thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        for channel in self._channels:
            channel.close()
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + drain_seconds + 10
        for process in self._processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("receiver process %s did not drain in time: killing it", process.pid)
                process.kill()
                process.join(5)
        for thread in self._threads:
            thread.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()
        codes = [p.exitcode for p in self._processes]
        self._processes, self._pipes, self._channels, self._listener, self._threads = [], [], [], None, []
        return codes

    def _accept(self) -> None:
        """Accept connections and hand each to the process serving the fewest."""
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, address = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._stopping.is_set():
                    log.exception("accepting a DICOM connection failed")
                    time.sleep(0.1)
                continue
            try:
                self._hand_over(conn, address)
            finally:
                conn.close()  # the receiver process holds its own copy

    def _hand_over(self, conn: socket.socket, address: tuple[Any, ...]) -> None:
        loads = self.loads()
        note = json.dumps([str(address[0]), int(address[1])]).encode()
        for index in sorted(range(self.count), key=lambda i: (loads[i], i)):
            try:
                socket.send_fds(self._channels[index], [note], [conn.fileno()])
            except OSError:
                continue  # that process is gone: the next one
            self._handed[index] += 1
            return
        log.error("no receiver process took the connection from %s", address[0])

    def _read(self) -> None:
        """Relay what the processes report (stored instances, CPU time); restart any that dies."""
        pipes = {pipe: index for index, pipe in enumerate(self._pipes)}
        while pipes:
            for ready in wait(list(pipes), timeout=0.5):
                pipe = ready if isinstance(ready, Connection) else None
                if pipe is None:
                    continue
                try:
                    kind, value = pipe.recv()
                except (EOFError, OSError):
                    index = pipes.pop(pipe)
                    if not self._stopping.is_set():
                        restarted = self._restart(index)
                        if restarted is not None:
                            pipes[restarted] = index
                    continue
                if kind == STORED and self.on_stored is not None:
                    for _ in range(int(value)):
                        self.on_stored()
                elif kind == CPU:
                    metrics.add_stage_cpu(metrics.Stage.RECEIVE, float(value))


def _listen(bind: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    sock.listen(128)
    sock.settimeout(0.25)  # so that stop() is noticed; accepted sockets are blocking
    return sock


# -- in each receiver process ----------------------------------------------------------


def _serve(
    payload: dict[str, Any],
    index: int,
    pipe: Connection,
    channel: socket.socket,
    associations: SynchronizedArray[int],
    finished: SynchronizedArray[int],
    write_lock: Any,
    log_level: int,
    daemon_pid: int,
) -> None:
    """A receiver process: its own AE, server, database engine and ingest, until SIGTERM."""
    _become_receiver_process(daemon_pid)
    logsetup.configure(log_level, tag=f"{PROCESS_NAME}-{index}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        from gastrolens.config import Settings
        from gastrolens.daemon.dicom_services import dicom_services
        from gastrolens.daemon.ingest import DatabaseIngest
        from gastrolens.db import Database
        from gastrolens.dicom_io.net.receiver import Receiver
        from gastrolens.storage.store import Store

        settings = Settings.model_validate(payload)
        dicom = settings.dicom
        db = Database(settings.database.url)
        store = Store(settings.storage.root, fsync=settings.storage.fsync, min_free_mb=settings.storage.min_free_mb)
        lock = threading.Lock()
        stored = [0]

        def count_stored() -> None:
            with lock:
                stored[0] += 1

        def connection_ended() -> None:
            with finished.get_lock():
                finished[index] += 1

        ingest = DatabaseIngest(
            store,
            db,
            writers=dicom.max_associations,
            on_stored=count_stored,
            write_lock=write_lock if db.engine.dialect.name == "sqlite" else None,
        )
        receiver = Receiver(
            dicom,
            ingest,
            handoff=True,
            node_associations=NodeCount(associations, index),
            on_connection_end=connection_ended,
            services=dicom_services(settings, db, store, write_lock if db.engine.dialect.name == "sqlite" else None),
        )
        receiver.start()
        threading.Thread(
            target=_take_connections, args=(channel, receiver), name="gastrolens-handoff", daemon=True
        ).start()
    except BaseException as exc:  # tell the daemon why, then exit
        pipe.send((FAILED, f"{exc.__class__.__name__}: {exc}"))
        raise
    pipe.send((READY, os.getpid()))
    cpu = time.process_time()
    while not stop.wait(0.2):
        with lock:
            count, stored[0] = stored[0], 0
        if count:
            pipe.send((STORED, count))
        now = time.process_time()
        if now - cpu >= 0.01:
            pipe.send((CPU, now - cpu))
            cpu = now
    receiver.stop(drain_seconds=dicom.network_timeout_seconds)
    ingest.close()
    with lock:
        if stored[0]:
            pipe.send((STORED, stored[0]))
    pipe.send((CPU, time.process_time() - cpu))
    db.dispose()
    pipe.close()


class NodeCount:
    """The node's negotiated associations, as one counter, kept in one slot per process.

    The receiver reads and changes ``value`` under ``get_lock()``: it sees the sum over all
    processes and changes only its own slot, so the daemon can free a dead process's slot.
    """

    def __init__(self, slots: SynchronizedArray[int], index: int) -> None:
        self._slots = slots
        self._index = index

    def get_lock(self) -> Any:
        return self._slots.get_lock()

    @property
    def value(self) -> int:
        return sum(self._slots[:])

    @value.setter
    def value(self, total: int) -> None:
        self._slots[self._index] += total - self.value


def _take_connections(channel: socket.socket, receiver: Any) -> None:
    """Serve each connection the daemon hands over, until it closes the channel."""
    while True:
        try:
            note, fds, _flags, _address = socket.recv_fds(channel, 1024, 1)
        except OSError:
            return
        if not note and not fds:
            return  # the daemon closed the channel: it stops
        for fd in fds[1:]:
            os.close(fd)
        if not fds:
            continue
        host, port = json.loads(note)
        receiver.serve_connection(socket.socket(fileno=fds[0]), (host, port))


def _become_receiver_process(daemon_pid: int) -> None:
    """Named ``gl-receiver`` (benchmarks attribute CPU by it), killed with the daemon, Ctrl-C left to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NAME, PROCESS_NAME.encode())
        if os.getppid() != daemon_pid:  # the daemon died before the line above: do not outlive it
            # (not ``== 1``: in a container without an init the daemon itself is PID 1)
            os._exit(1)
