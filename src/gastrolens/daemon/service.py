"""The running service: wires the store, the database and the DICOM receiver.

``Service.run()`` blocks until SIGTERM or SIGINT, then refuses new associations,
lets in-flight stores finish and returns.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from gastrolens import __version__
from gastrolens.config import Settings
from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType
from gastrolens.dicom_io.receiver import Receiver
from gastrolens.dicom_io.store import Store

log = logging.getLogger(__name__)


def service_actor() -> str:
    return f"service:{socket.gethostname()}:{os.getpid()}"


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database.url)
        self.store = Store(settings.storage.root, fsync=settings.storage.fsync, min_free_mb=settings.storage.min_free_mb)
        self.receiver = Receiver(settings.dicom, self.store, self.db)
        self._stop = threading.Event()

    def start(self) -> None:
        self.db.upgrade()
        self.receiver.start()
        with self.db.session() as session:
            audit.record(session, audit.Event(AuditEventType.SERVICE_STARTED, service_actor(), detail={
                "version": __version__, "ae_title": self.settings.dicom.ae_title,
                "bind": self.settings.dicom.bind, "port": self.receiver.port}))

    def stop(self) -> None:
        self.receiver.stop()
        with self.db.session() as session:
            audit.record(session, audit.Event(AuditEventType.SERVICE_STOPPED, service_actor()))
        self.db.dispose()
        log.info("GastroLens stopped")

    def request_stop(self, *_args: object) -> None:
        self._stop.set()

    def run(self) -> None:
        """Start, wait for SIGTERM/SIGINT, stop."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        print(f"GastroLens ready: AE title {self.settings.dicom.ae_title} on {self.settings.dicom.bind}:{self.receiver.port}", flush=True)
        self._stop.wait()
        log.info("stop requested: refusing new associations, finishing in-flight stores")
        self.stop()
