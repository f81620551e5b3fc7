"""The running service: store, database, DICOM receiver, model engine and scheduled jobs.

Which of these one process runs is its role (``[daemon] role``, ``serve --role``): ``receiver``
runs the DICOM services and the API and loads no model; ``worker`` runs inference, study
completion, delivery and retention and the API, and opens no DICOM port; ``all`` runs both.
Any number of each share one database and one storage root (see docs/deploy.md).

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
from gastrolens.config.schema import ServiceRole
from gastrolens.daemon.completion import SIGNAL_POLL_SECONDS, StudyCompletion
from gastrolens.daemon.delivery import DeliveryStep
from gastrolens.daemon.dicom_services import dicom_services
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
COMPLETION_SIGNALS = "study-completion-signals"

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
        self.role = settings.daemon.role
        self.ingest: DatabaseIngest | None = None
        self.receiver: Receiver | ReceiverPool | None = None
        processes = process_count(settings.dicom)
        if not self.role.receives:
            pass  # a worker opens no DICOM port
        elif processes > 1:  # ingest grows with cores: see daemon.receivers
            self.receiver = ReceiverPool(
                settings, processes, on_stored=self._count_stored, log_level=logging.getLogger().getEffectiveLevel()
            )
        else:
            write_lock = threading.Lock() if self.db.engine.dialect.name == "sqlite" else None
            self.ingest = DatabaseIngest(
                self.store,
                self.db,
                writers=settings.dicom.max_associations,
                on_stored=self._count_stored,
                write_lock=write_lock,
            )
            self.receiver = Receiver(settings.dicom, self.ingest,
                                     services=dicom_services(settings, self.db, self.store, write_lock))
        self.stow_ingest = self._stow_ingest()
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

    def _stow_ingest(self) -> DatabaseIngest | None:
        """Where STOW-RS requests to this process's API go: the C-STORE ingest of this process, or,
        beside receiver processes, one sharing their SQLite write lock. A worker stores nothing."""
        if not self.settings.api.enabled or not self.role.receives:
            return None
        if self.ingest is not None:
            return self.ingest
        sqlite = self.db.engine.dialect.name == "sqlite"
        return DatabaseIngest(
            self.store,
            self.db,
            on_stored=self._count_stored,
            write_lock=self.receiver.write_lock if sqlite and isinstance(self.receiver, ReceiverPool) else None,
        )

    def start(self) -> None:
        if self.settings.daemon.migrate_on_start:
            self.db.upgrade()
        else:  # one job migrates (gastrolens db upgrade); a replica refuses a schema it does not know
            self.db.require_current_schema()
        if self.role.works:
            self._start_jobs()
        if self.receiver is not None:
            self.receiver.start()
        if self.role.works:
            self.scheduler.start()
        if self.settings.api.enabled:
            self.api = ApiServer(
                self.settings, self.db, store_root=self.settings.storage.root, health_probe=self.health,
                ingest=self.stow_ingest,
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
                        "role": self.role.value,
                        "ae_title": self.settings.dicom.ae_title,
                        "bind": self.settings.dicom.bind if self.receiver else None,
                        "port": self.receiver.port if self.receiver else None,
                        "destinations": [d.name for d in self.settings.destinations] if self.role.works else [],
                    },
                ),
            )

    def _start_jobs(self) -> None:
        """Load the model and schedule inference, study completion, delivery and retention."""
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
        completion = StudyCompletion(self.settings, self.db, self.store, self.worker)
        self.scheduler.add(COMPLETION, completion.run_once, interval)
        self.scheduler.add(COMPLETION_SIGNALS, completion.run_signals, SIGNAL_POLL_SECONDS)  # MPPS, command
        self.scheduler.add(DELIVERY, DeliveryStep(self.settings, self.db, self.store, self.worker).run_once, interval)
        self.scheduler.add(
            RETENTION,
            RetentionStep(self.settings, self.db, self.store, self.worker).run_once,
            RETENTION_INTERVAL_SECONDS,
        )

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
        if self.api is not None:
            self.api.stop()  # before the ingest closes: in-flight STOW-RS requests finish
        if self.ingest is not None:
            self.ingest.close()
        if self.stow_ingest is not None and self.stow_ingest is not self.ingest:
            self.stow_ingest.close()
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
        print(f"GastroLens ready: {self.ready_line()}", flush=True)
        self._stop.wait()
        log.info("stop requested: refusing new associations, finishing in-flight stores and the running batch")
        self.stop()
        return self.exit_status

    def ready_line(self) -> str:
        """What this process serves, for the one line printed when it is ready."""
        parts = []
        if self.receiver is not None:
            dicom = self.settings.dicom
            parts.append(f"AE title {dicom.ae_title} on {dicom.bind}:{self.receiver.port}")
        if self.engine is not None:
            model = self.engine.identity
            parts.append(f"model {model.name}{' - ' + UNTRAINED_WARNING if model.untrained else ''}")
        if self.api is not None:
            parts.append(f"API on {self.api.url}")
        text = ", ".join(parts)
        return text if self.role is ServiceRole.ALL else f"{text} [role {self.role.value}]"

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
        """What /healthz reports besides the database and storage: the role and that role's parts."""
        report: dict[str, Any] = {"role": self.role.value}
        if self.role.works:
            identity = self.engine.identity if self.engine else None
            report["scheduler"] = {
                "ok": self.scheduler.running,
                "last_runs": {k: v.isoformat() for k, v in self.scheduler.last_run.items()},
            }
            report["model"] = {
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
            }
        if self.receiver is not None:
            report["receiver"] = {"ok": self.receiver.listening}
        return report
