"""Several receiver processes on one port, so that ingest grows with cores.

pynetdicom decodes PDUs and runs handlers in Python threads: in one process every
association shares one GIL. :class:`ReceiverPool` starts ``dicom.receiver_processes``
processes (spawned, named ``gl-receiver`` in ``/proc/<pid>/comm``), each with its own
pynetdicom AE and server bound with SO_REUSEPORT, its own database engine and its own
:class:`~gastrolens.daemon.ingest.DatabaseIngest`; the kernel spreads connections
over them. What holds across processes:

- durability: each process persists exactly as one does (fsync + rename, then row and
  audit event committed, then 0x0000);
- one audit chain, one writer at a time: ``db.audit`` serialises appends (PostgreSQL
  advisory lock, SQLite ``BEGIN IMMEDIATE``), whichever process writes;
- ``dicom.max_associations`` is a whole-node limit: negotiated associations are
  counted in shared memory and refused (A-ASSOCIATE-RJ, transient, local limit
  exceeded) beyond it; connections that never negotiate are bounded by
  ``acse_timeout_seconds`` in each process;
- the processes die with the daemon (PR_SET_PDEATHSIG) and drain on SIGTERM.

The daemon hears of each stored instance (to wake inference on a full batch) and of
the receivers' CPU time (metrics, stage ``receive``) through one pipe per process.
"""

from __future__ import annotations

import ctypes
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
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from gastrolens import metrics
from gastrolens.config.schema import DicomSettings

log = logging.getLogger(__name__)

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PROCESS_NAME = "gl-receiver"
MAX_PROCESSES = 8
READY, STORED, CPU, FAILED = "ready", "stored", "cpu", "failed"


def process_count(settings: DicomSettings) -> int:
    """``dicom.receiver_processes``, or one per CPU, at most :data:`MAX_PROCESSES`."""
    if settings.receiver_processes is not None:
        return settings.receiver_processes
    return max(1, min(os.cpu_count() or 1, MAX_PROCESSES))


class ReceiverPool:
    """``count`` receiver processes serving ``settings.port`` (0: a free port, chosen here)."""

    def __init__(self, settings: Any, count: int, *, on_stored: Callable[[], None] | None = None,
                 log_level: int = logging.INFO) -> None:
        self.settings = settings
        self.count = count
        self.on_stored = on_stored
        self.log_level = log_level
        self._processes: list[SpawnProcess] = []
        self._pipes: list[Connection] = []
        self._reservation: socket.socket | None = None
        self._port = 0
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        context = multiprocessing.get_context("spawn")
        self._associations: Synchronized[int] = context.Value("i", 0)

    @property
    def port(self) -> int:
        return self._port

    @property
    def listening(self) -> bool:
        return bool(self._processes) and all(p.is_alive() for p in self._processes)

    def start(self, timeout: float = 120.0) -> None:
        dicom: DicomSettings = self.settings.dicom
        self._reservation = _reserve_port(dicom.bind, dicom.port)
        self._port = int(self._reservation.getsockname()[1])
        context = multiprocessing.get_context("spawn")
        # Only what a receiver needs (secrets such as API tokens stay in the daemon).
        payload = {section: getattr(self.settings, section).model_dump(mode="json")
                   for section in ("dicom", "storage", "database")}
        for index in range(self.count):
            parent_end, child_end = context.Pipe(duplex=False)
            process = context.Process(target=_serve, name=f"{PROCESS_NAME}-{index}", daemon=True,
                                      args=(payload, self._port, index, child_end, self._associations, self.log_level))
            process.start()
            child_end.close()
            self._processes.append(process)
            self._pipes.append(parent_end)
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
        self._reader = threading.Thread(target=self._read, name="gastrolens-receivers", daemon=True)
        self._reader.start()
        log.info("%d receiver processes listening on %s:%d", self.count, dicom.bind, self._port)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """SIGTERM each process (it refuses new associations and drains), then wait for it."""
        self._stopping.set()
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
        if self._reader is not None:
            self._reader.join(timeout=5)
        for pipe in self._pipes:
            pipe.close()
        if self._reservation is not None:
            self._reservation.close()
        self._processes, self._pipes, self._reservation, self._reader = [], [], None, None

    def _read(self) -> None:
        """Relay what the processes report: stored instances and their CPU time."""
        pipes = list(self._pipes)
        while pipes:
            for ready in wait(pipes, timeout=0.5):
                pipe = ready if isinstance(ready, Connection) else None
                if pipe is None:
                    continue
                try:
                    kind, value = pipe.recv()
                except (EOFError, OSError):
                    pipes.remove(pipe)
                    if not self._stopping.is_set():
                        log.error("a receiver process ended unexpectedly")
                    continue
                if kind == STORED and self.on_stored is not None:
                    for _ in range(int(value)):
                        self.on_stored()
                elif kind == CPU:
                    metrics.add_stage_cpu(metrics.Stage.RECEIVE, float(value))


def _reserve_port(bind: str, port: int) -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT: fixes the port, including a free one for
    port 0, that every receiver process then binds too. Connections only go to listeners."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bind, port))
    return sock


# -- in each receiver process ----------------------------------------------------------


def _serve(payload: dict[str, Any], port: int, index: int, pipe: Connection,
           associations: Synchronized[int], log_level: int) -> None:
    """A receiver process: its own AE, server, database engine and ingest, until SIGTERM."""
    _become_receiver_process()
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{PROCESS_NAME}-{index}] %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        from gastrolens.config import Settings
        from gastrolens.daemon.ingest import DatabaseIngest
        from gastrolens.db import Database
        from gastrolens.dicom_io.net.receiver import Receiver
        from gastrolens.storage.store import Store

        settings = Settings.model_validate(payload)
        dicom = settings.dicom.model_copy(update={"port": port})
        db = Database(settings.database.url)
        store = Store(settings.storage.root, fsync=settings.storage.fsync, min_free_mb=settings.storage.min_free_mb)
        lock = threading.Lock()
        stored = [0]

        def count_stored() -> None:
            with lock:
                stored[0] += 1

        ingest = DatabaseIngest(store, db, writers=dicom.max_associations, on_stored=count_stored)
        receiver = Receiver(dicom, ingest, reuse_port=True, node_associations=associations)
        receiver.start()
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


def _become_receiver_process() -> None:
    """Named ``gl-receiver`` (benchmarks attribute CPU by it), killed with the daemon, Ctrl-C left to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NAME, PROCESS_NAME.encode())
        if os.getppid() == 1:  # the daemon died before the line above: do not outlive it
            os._exit(1)
