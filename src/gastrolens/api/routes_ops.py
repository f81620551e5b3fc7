"""Operations endpoints for the hospital's monitoring: ``/healthz``, ``/livez`` and ``/metrics``.

``/healthz`` is readiness: the database, the storage and this process's own parts.
``/livez`` is liveness: this process's own parts only, so that a database or storage
outage takes a pod out of service (readiness) without restarting it over and over.

Both are open without a token when ``[api] open_health`` / ``open_metrics`` say so
(health is open by default, metrics are not); otherwise they need a viewer token.
They report counts and component states, never patient data, and are not audited
(a scrape every few seconds would bury the audit trail).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text

from gastrolens.api.auth import Role
from gastrolens.api.context import ApiContext, authorize, context_of
from gastrolens.api.routes_data import Credentials
from gastrolens.api.scrape import exposition
from gastrolens.errors import DatabaseError

log = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Component(BaseModel):
    ok: bool | None
    detail: dict[str, Any] = {}


class Health(BaseModel):
    status: str
    """ok: every component that reported is fine; failing: at least one is not."""
    role: str | None = None
    """The serving process's role (all, receiver, worker); its components are that role's parts.
    A load balancer or Kubernetes readiness probe routes to the process only while status is ok."""
    components: dict[str, Component]


@router.get("/healthz", response_model=Health, summary="Database, storage, scheduler and model state",
            responses={503: {"model": Health, "description": "some component is failing"}})
def healthz(request: Request, credentials: Credentials) -> JSONResponse:
    return _health(request, credentials, shared=True)


@router.get("/livez", response_model=Health, summary="This process's own parts (not the database or storage)",
            responses={503: {"model": Health, "description": "a part of this process is failing: restart it"}})
def livez(request: Request, credentials: Credentials) -> JSONResponse:
    return _health(request, credentials, shared=False)


def _health(request: Request, credentials: Credentials, *, shared: bool) -> JSONResponse:
    """This process's components, and with ``shared`` the database and storage it depends on."""
    ctx = context_of(request)
    if not ctx.settings.api.open_health:
        authorize(request, credentials, Role.VIEWER)
    role, components = _probed(ctx)
    if shared:
        components = {"database": _database(ctx), "storage": _storage(ctx), **components}
    failing = any(c.ok is False for c in components.values())
    body = Health(status="failing" if failing else "ok", role=role, components=components)
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if failing else 200)


@router.get("/metrics", response_class=Response, summary="Prometheus text exposition",
            responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request, credentials: Credentials) -> Response:
    ctx = context_of(request)
    if not ctx.settings.api.open_metrics:
        authorize(request, credentials, Role.VIEWER)
    return Response(exposition(request.app.state.metrics), media_type=PROMETHEUS_CONTENT_TYPE)


def _database(ctx: ApiContext) -> Component:
    try:
        with ctx.db.read_session() as session:
            session.execute(text("SELECT 1"))
    except DatabaseError as exc:
        log.warning("health: database unavailable: %s", exc)
        return Component(ok=False, detail={"error": "the database did not answer"})
    return Component(ok=True, detail={"dialect": ctx.db.engine.dialect.name})


def _storage(ctx: ApiContext) -> Component:
    root = ctx.store_root
    minimum = ctx.settings.storage.min_free_mb
    try:
        free_mb = shutil.disk_usage(root).free // (1024 * 1024)
    except OSError as exc:
        return Component(ok=False, detail={"error": f"storage root unavailable: {exc.strerror}"})
    writable = os.access(root, os.W_OK)
    detail: dict[str, Any] = {"free_mb": free_mb, "min_free_mb": minimum, "writable": writable}
    return Component(ok=writable and free_mb >= minimum, detail=detail)


def _probed(ctx: ApiContext) -> tuple[str | None, dict[str, Component]]:
    """The service's role and its own components (scheduler, model, receiver: those of its role);
    unknown when no service reports them."""
    if ctx.health_probe is None:
        return None, {name: Component(ok=None, detail={"note": "not reported: no service attached"})
                      for name in ("scheduler", "model")}
    try:
        reported = dict(ctx.health_probe())
    except Exception as exc:  # a failing probe is a failing service, not a failing endpoint
        log.exception("health probe failed")
        return None, {"service": Component(ok=False,
                                           detail={"error": f"health probe raised {exc.__class__.__name__}"})}
    role = reported.pop("role", None)
    components = {}
    for name, value in reported.items():
        if isinstance(value, bool):
            components[name] = Component(ok=value)
        elif isinstance(value, dict):
            detail = {k: v for k, v in value.items() if k != "ok"}
            ok = value.get("ok")
            components[name] = Component(ok=ok if isinstance(ok, bool) else None, detail=detail)
        else:
            components[name] = Component(ok=None, detail={"value": str(value)})
    return (str(role) if role is not None else None), components
