"""Running the API app under uvicorn in a background thread of the daemon.

``ApiServer.start()`` binds the socket first (so a busy port fails at once, with the
port in the error, and port 0 picks a free one), then serves from a daemon thread;
``stop()`` asks uvicorn to finish in-flight requests and joins the thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from gastrolens.api.app import create_app
from gastrolens.api.context import HealthProbe
from gastrolens.config import Settings
from gastrolens.db import Database
from gastrolens.dicom_io.net.received import Ingest
from gastrolens.errors import GastroLensError

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 15.0


class ApiServer:
    """The HTTP API, dashboard and metrics of one GastroLens process."""

    def __init__(self, settings: Settings, db: Database, *, store_root: Path | None = None,
                 health_probe: HealthProbe | None = None, ingest: Ingest | None = None) -> None:
        self.settings = settings
        self.app = create_app(settings, db, store_root, health_probe, ingest)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the settings say 0)."""
        if self._socket is None:
            raise GastroLensError("the API server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.settings.api.bind
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in the background; GastroLensError if the address cannot be bound."""
        bind, port = self.settings.api.bind, self.settings.api.port
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
        except OSError as exc:
            sock.close()
            raise GastroLensError(f"API: cannot bind {bind}:{port}: {exc.strerror}") from exc
        sock.listen(128)
        sock.set_inheritable(True)
        self._socket = sock
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="gastrolens-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise GastroLensError("API: the HTTP server did not start")
            time.sleep(0.02)
        log.info("API and dashboard on %s (%d tokens configured)", self.url, len(self.app.state.ctx.tokens))

    def stop(self) -> None:
        """Finish in-flight requests and stop serving; safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                log.warning("API: server thread did not stop within 10 s")
        if self._socket is not None:
            self._socket.close()
        self._server, self._thread, self._socket = None, None, None
