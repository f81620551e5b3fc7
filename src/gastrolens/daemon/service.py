"""The running service: store, database, DICOM receiver, model engine and scheduled jobs.

``Service.run()`` blocks until SIGTERM or SIGINT, then refuses new associations,
lets in-flight stores finish, finishes the running batch and returns its exit status:
0, or :data:`EXIT_DEVICE_LOST` when the inference device failed for good (a CUDA
context cannot be recovered inside the process; the service manager starts a fresh one).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping
from typing import Any

from gastrolens import UNTRAINED_WARNING, __version__
from gastrolens.api.server import ApiServer
from gastrolens.config import Settings
from gastrolens.daemon.completion import StudyCompletion
from gastrolens.daemon.delivery import DeliveryStep
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.daemon.pipeline import InferenceStep
from gastrolens.daemon.receivers import ReceiverPool, process_count
from gastrolens.daemon.retention import RetentionStep
from gastrolens.daemon.scheduler import RETENTION_INTERVAL_SECONDS, Scheduler
from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.errors import DeviceError
from gastrolens.models import Engine
from gastrolens.storage.store import Store

log = logging.getLogger(__name__)

INFERENCE, COMPLETION, DELIVERY, RETENTION = "inference", "study-completion", "delivery", "retention"

EXIT_DEVICE_LOST = 75
"""EX_TEMPFAIL: the inference device failed; systemd's Restart=on-failure starts a fresh process."""


def service_actor() -> str:
    return f"service:{socket.gethostname()}:{os.getpid()}"


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker = service_actor()
        self.db = Database(settings.database.url)
        self.store = Store(
            settings.storage.root, fsync=settings.storage.fsync, min_free_mb=settings.storage.min_free_mb
        )
        self.ingest: DatabaseIngest | None = None
        self.receiver: Receiver | ReceiverPool
        processes = process_count(settings.dicom)
        if processes > 1:  # ingest grows with cores: see daemon.receivers
            self.receiver = ReceiverPool(
                settings, processes, on_stored=self._count_stored, log_level=logging.getLogger().getEffectiveLevel()
            )
        else:
            self.ingest = DatabaseIngest(
                self.store,
                self.db,
                writers=settings.dicom.max_associations,
                on_stored=self._count_stored,
                write_lock=threading.Lock() if self.db.engine.dialect.name == "sqlite" else None,
            )
            self.receiver = Receiver(settings.dicom, self.ingest)
        self.scheduler = Scheduler()
        self.engine: Engine | None = None
        self.inference: InferenceStep | None = None
        self.api: ApiServer | None = None
        self._stored_since_batch = 0
        self._stored_lock = threading.Lock()
        self._stop = threading.Event()
        self.exit_status = 0
        self._stop_reason: str | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.db.upgrade()
        self.engine = Engine.from_settings(self.settings.model)
        identity = self.engine.identity
        with self.db.session() as session:
            audit.record(
                session,
                audit.Event(
                    type=AuditEventType.MODEL_LOADED,
                    actor=self.worker,
                    outcome=Outcome.WARNING if identity.untrained else Outcome.SUCCESS,
                    detail={
                        "name": identity.name,
                        "version": identity.version,
                        "weights_sha256": identity.weights_sha256,
                        "untrained": identity.untrained,
                        "device": str(self.engine.device),
                        **({"warning": UNTRAINED_WARNING} if identity.untrained else {}),
                    },
                ),
            )
        self.inference = InferenceStep(self.settings, self.db, self.store, self.engine, self.worker)
        interval = self.settings.scheduler.interval_seconds
        self.scheduler.add(INFERENCE, self.drain_queue, interval)
        self.scheduler.add(
            COMPLETION, StudyCompletion(self.settings, self.db, self.store, self.worker).run_once, interval
        )
        self.scheduler.add(DELIVERY, DeliveryStep(self.settings, self.db, self.store, self.worker).run_once, interval)
        self.scheduler.add(
            RETENTION,
            RetentionStep(self.settings, self.db, self.store, self.worker).run_once,
            RETENTION_INTERVAL_SECONDS,
        )
        self.receiver.start()
        self.scheduler.start()
        if self.settings.api.enabled:
            self.api = ApiServer(
                self.settings, self.db, store_root=self.settings.storage.root, health_probe=self.health
            )
            self.api.start()
            log.info("HTTP API and dashboard on %s", self.api.url)
        with self.db.session() as session:
            audit.record(
                session,
                audit.Event(
                    type=AuditEventType.SERVICE_STARTED,
                    actor=self.worker,
                    detail={
                        "version": __version__,
                        "ae_title": self.settings.dicom.ae_title,
                        "bind": self.settings.dicom.bind,
                        "port": self.receiver.port,
                        "destinations": [d.name for d in self.settings.destinations],
                    },
                ),
            )

    def stop(self) -> None:
        self.receiver.stop()
        if self.ingest is not None:
            self.ingest.close()
        if self.api is not None:
            self.api.stop()
        self.scheduler.shutdown()
        if self.inference is not None:
            self.inference.close()
        if self.engine is not None:
            self.engine.close()
        with self.db.session() as session:
            audit.record(
                session,
                audit.Event(
                    type=AuditEventType.SERVICE_STOPPED,
                    actor=self.worker,
                    outcome=Outcome.FAILURE if self.exit_status else Outcome.SUCCESS,
                    detail={
                        "exit_status": self.exit_status,
                        **({"reason": self._stop_reason} if self._stop_reason else {}),
                    },
                ),
            )
        self.db.dispose()
        log.info("GastroLens stopped")

    def request_stop(self, *_args: object) -> None:
        self._stop.set()

    def run(self) -> int:
        """Start, wait for SIGTERM/SIGINT (or a lost device), stop; the exit status."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        model = self.engine.identity if self.engine else None
        dicom = self.settings.dicom
        print(
            f"GastroLens ready: AE title {dicom.ae_title} on {dicom.bind}:{self.receiver.port}"
            f" (model {model.name if model else '?'}{' - ' + UNTRAINED_WARNING if model and model.untrained else ''})",
            flush=True,
        )
        self._stop.wait()
        log.info("stop requested: refusing new associations, finishing in-flight stores and the running batch")
        self.stop()
        return self.exit_status

    # -- jobs ----------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def drain_queue(self) -> None:
        """Run batches until the queue is empty (or a stop is requested)."""
        assert self.inference is not None
        with self._stored_lock:
            self._stored_since_batch = 0
        try:
            self.inference.drain(self._stop.is_set)
        except DeviceError as exc:  # every claim was handed back; only a fresh process gets a working device
            log.critical("the inference device failed (%s); stopping with exit status %d for a restart",
                         exc, EXIT_DEVICE_LOST)
            self.exit_status = EXIT_DEVICE_LOST
            self._stop_reason = f"inference device failed: {exc}"
            self._stop.set()

    def _count_stored(self) -> None:
        with self._stored_lock:
            self._stored_since_batch += 1
            full = self._stored_since_batch >= self.settings.model.batch_size
        if full:
            self.scheduler.wake(INFERENCE)

    def health(self) -> Mapping[str, Any]:
        """What /healthz reports besides the database and storage."""
        identity = self.engine.identity if self.engine else None
        return {
            "scheduler": {
                "ok": self.scheduler.running,
                "last_runs": {k: v.isoformat() for k, v in self.scheduler.last_run.items()},
            },
            "model": {
                "ok": identity is not None,
                **(
                    {
                        "name": identity.name,
                        "version": identity.version,
                        "weights_sha256": identity.weights_sha256,
                        "untrained": identity.untrained,
                    }
                    if identity
                    else {}
                ),
            },
            "receiver": {"ok": self.receiver.listening},
        }
