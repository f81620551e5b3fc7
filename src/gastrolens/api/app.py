"""The FastAPI application: JSON API, dashboard, health and metrics, with one error shape.

Every error answer is JSON ``{"detail": message, "errors": [{"field", "message"}]}``
(dashboard pages answer HTML). Bad input is a 4xx naming the field, the database being
down is a 503, and nothing else should ever be a 500. The access log names the method,
path, status and token, never the query string (it may hold a patient ID) unless
``[logging] patient_details`` is on. The interactive docs are off (they load from a
CDN); the OpenAPI document is at ``/openapi.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from gastrolens import __version__
from gastrolens.api import dashboard, dicomweb, routes_data, routes_ops, stow
from gastrolens.api.context import ApiContext, ApiError, HealthProbe
from gastrolens.api.scrape import app_registry
from gastrolens.config import Settings
from gastrolens.db import Database
from gastrolens.db.filters import explain_errors
from gastrolens.dicom_io.net.received import Ingest
from gastrolens.errors import DatabaseError

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_QUIET_PATHS = ("/healthz", "/metrics")


def create_app(settings: Settings, db: Database, store_root: Path | None = None,
               health_probe: HealthProbe | None = None, ingest: Ingest | None = None) -> FastAPI:
    """The app over ``db``; overlays are read below ``store_root`` (default: the settings' storage root).

    ``ingest``: where STOW-RS instances go (the daemon hands its C-STORE ingest); None: STOW-RS answers 503.
    """
    app = FastAPI(
        title="GastroLens API",
        version=__version__,
        description="Read-only access to what GastroLens received, concluded and delivered, and to its audit trail. "
                    "Send `Authorization: Bearer TOKEN`; every read is audited under the token's name.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ApiContext(settings, db, Path(store_root or settings.storage.root), health_probe, ingest)
    app.state.metrics = app_registry(db, settings.destination_kinds())
    app.include_router(routes_data.router)
    app.include_router(routes_ops.router)
    app.include_router(stow.router)
    app.include_router(dicomweb.router)
    app.include_router(dashboard.router)
    _add_error_handlers(app)
    _add_access_log(app, settings.logging.patient_details)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "errors": exc.errors}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = explain_errors(exc.errors())
        message = "invalid request: " + "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        return JSONResponse({"detail": message, "errors": problems}, status_code=422)

    @app.exception_handler(dashboard.DashboardRedirect)
    async def _redirect(_request: Request, exc: dashboard.DashboardRedirect) -> Response:
        return exc.response

    @app.exception_handler(DatabaseError)
    async def _database(_request: Request, exc: DatabaseError) -> JSONResponse:
        log.error("API: %s", exc)
        return JSONResponse({"detail": "the database is unavailable; try again later", "errors": []}, status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("API: unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the node's log has the details", "errors": []}, status_code=500)


def _add_access_log(app: FastAPI, patient_details: bool) -> None:
    @app.middleware("http")
    async def _log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        principal = getattr(request.state, "principal", None)
        target = request.url.path
        if patient_details and request.url.query and "token=" not in request.url.query:
            target += "?" + request.url.query
        level = logging.DEBUG if request.url.path in _QUIET_PATHS else logging.INFO
        log.log(level, "%s %s %d %.1f ms%s", request.method, target, response.status_code,
                (time.perf_counter() - started) * 1000, f" token={principal.name}" if principal else "")
        return response

