"""What every request handler shares: settings, database, tokens, and the audited read.

Every read of data goes through :meth:`ApiContext.read`, which runs the query in a
read-only session (it never holds the write lock, so a slow query cannot stall a
C-STORE) and then appends its QUERY audit event (actor ``api:<token name>``, path,
filter, rows) before answering, so a read that was answered is a read that was recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from gastrolens.api.auth import Principal, Role, TokenRegistry
from gastrolens.config import Settings
from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.dicom_io.net.received import Ingest

log = logging.getLogger(__name__)

T = TypeVar("T")
HealthProbe = Callable[[], Mapping[str, Any]]
"""Returns component -> bool, or component -> {"ok": bool, ...detail}; e.g. scheduler and model."""

COOKIE = "gastrolens_token"
bearer_scheme = HTTPBearer(auto_error=False, description="a token from `gastrolens api token`")


class ApiError(Exception):
    """An answer other than success: status, a message for the client, optional field problems."""

    def __init__(self, status: int, message: str, *, errors: list[dict[str, str]] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or []
        self.headers = dict(headers or {})


class LoginRequired(Exception):
    """A dashboard page was asked for without a valid token: the browser goes to the login form."""


@dataclass
class ApiContext:
    settings: Settings
    db: Database
    store_root: Path
    health_probe: HealthProbe | None = None
    ingest: Ingest | None = None
    """Where STOW-RS instances go (the daemon's, as for C-STORE); None: this app stores nothing."""
    tokens: TokenRegistry = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenRegistry(self.settings.api.tokens)

    def read(self, principal: Principal, request: Request, query: Callable[[Session], T], *,
             rows: Callable[[T], int], criteria: Mapping[str, Any] | None = None,
             study_uid: str | None = None, sop_uid: str | None = None) -> T:
        """Run ``query`` in a read session, then audit it; ``rows(result)`` counts what was returned."""
        with self.db.read_session() as session:
            result = query(session)
            count = rows(result)
        with self.db.session() as session:
            audit.record(
                session,
                audit.Event(
                    type=AuditEventType.QUERY,
                    actor=principal.actor,
                    outcome=Outcome.SUCCESS,
                    study_uid=study_uid,
                    sop_uid=sop_uid,
                    detail={"path": request.url.path, "filter": dict(criteria or {}), "rows": count},
                ),
            )
        return result

    def refuse(self, principal: Principal, request: Request, needed: Role) -> None:
        """Audit a read that a valid token's role does not allow."""
        with self.db.session() as session:
            audit.record(
                session,
                audit.Event(
                    type=AuditEventType.QUERY,
                    actor=principal.actor,
                    outcome=Outcome.FAILURE,
                    detail={"path": request.url.path, "refused": f"role {principal.role.value}, needs {needed.value}"},
                ),
            )


def context_of(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def presented_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The bearer token of the Authorization header, else the dashboard's cookie."""
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    return request.cookies.get(COOKIE)


def authorize(request: Request, credentials: HTTPAuthorizationCredentials | None, needed: Role) -> Principal:
    """The principal of the request's token, or ApiError 401 (no/unknown token) / 403 (role)."""
    ctx = context_of(request)
    principal = ctx.tokens.identify(presented_token(request, credentials))
    if principal is None:
        log.warning(
            "refused %s %s from %s: no valid token",
            request.method,
            request.url.path,
            request.client.host if request.client else "?",
        )
        raise ApiError(
            401,
            "a valid token is required: send 'Authorization: Bearer TOKEN' "
            "(tokens are made with 'gastrolens api token')",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not principal.role.grants(needed):
        ctx.refuse(principal, request, needed)
        raise ApiError(403, f"token {principal.name!r} has role {principal.role.value}; this needs {needed.value}")
    request.state.principal = principal
    return principal
