"""ApiServer: uvicorn in a background thread on a real socket, started and stopped by the daemon."""

from __future__ import annotations

import socket

import httpx
import pytest

from gastrolens.api.server import ApiServer
from gastrolens.errors import GastroLensError

from .readside import VIEWER, Node, settings_for


def test_start_on_a_free_port_serve_and_stop(sqlite_node: Node) -> None:
    server = ApiServer(sqlite_node.settings, sqlite_node.db, store_root=sqlite_node.storage)
    server.start()
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        response = httpx.get(f"{server.url}/api/studies", headers=VIEWER, params={"limit": 1})
        assert response.status_code == 200 and response.json()["total"] == sqlite_node.filled.study_count
        assert "server" not in response.headers
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{response.url.port}/healthz", timeout=2)
    server.stop()  # twice is harmless


def test_a_busy_port_fails_at_start_naming_it(sqlite_node: Node) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        settings = settings_for(sqlite_node.url, sqlite_node.storage).model_copy(
            update={"api": sqlite_node.settings.api.model_copy(update={"port": port})})
        with pytest.raises(GastroLensError, match=f"127.0.0.1:{port}"):
            ApiServer(settings, sqlite_node.db).start()
