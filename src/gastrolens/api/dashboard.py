"""The dashboard: server-rendered HTML pages over the same queries as the API, no external assets.

Browsers cannot easily send a bearer header, so the dashboard takes the token once
and keeps it in an HttpOnly, SameSite=Strict cookie (Secure over HTTPS) for
:data:`COOKIE_MAX_AGE` seconds: either through the form at ``/login``, or by opening
any page with ``?token=TOKEN``, which sets the cookie and redirects to the same page
without the token in the address. ``POST /logout`` clears it. Every page view is
audited like an API read, with the token's name.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel, ValidationError

from gastrolens.api.auth import Principal, Role
from gastrolens.api.context import COOKIE, ApiContext, context_of
from gastrolens.api.thumbnails import overlay_available
from gastrolens.db import audit as audit_chain
from gastrolens.db.filters import AuditQuery, DeliveryQuery, StudyQuery, StudyState, check_uid, explain
from gastrolens.db.queries import status_counts
from gastrolens.db.queries_audit import list_events
from gastrolens.db.queries_queue import delivery_counts, failed_instances, list_deliveries
from gastrolens.db.queries_studies import get_study, list_studies
from gastrolens.db.states import AuditEventType, DeliveryState
from gastrolens.findings import CLASS_ORDER, LesionClass

log = logging.getLogger(__name__)

COOKIE_MAX_AGE = 8 * 3600
"""A working shift; the browser forgets the token after that."""
MAX_FORM_BYTES = 4096

router = APIRouter(include_in_schema=False)
templates = Environment(loader=PackageLoader("gastrolens.api", "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)


class DashboardRedirect(Exception):
    """Answer with ``response`` (a redirect to the login form, or one that sets the cookie)."""

    def __init__(self, response: Response) -> None:
        super().__init__("redirect")
        self.response = response


# -- authentication ----------------------------------------------------------------------------


def _who(request: Request, needed: Role = Role.VIEWER) -> Principal | HTMLResponse:
    """The viewer of this page, or raise a redirect; an HTML 403 page when the role is too low."""
    ctx = context_of(request)
    token = request.query_params.get("token")
    if token is not None:
        if ctx.tokens.identify(token) is None:
            raise DashboardRedirect(_login_redirect(request, error="unknown token"))
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(params)}" if params else "")
        response = RedirectResponse(target, status_code=303)
        _set_cookie(request, response, token)
        raise DashboardRedirect(response)
    principal = ctx.tokens.identify(request.cookies.get(COOKIE))
    if principal is None:
        raise DashboardRedirect(_login_redirect(request))
    if not principal.role.grants(needed):
        ctx.refuse(principal, request, needed)
        return _page(request, "error.html", principal, status=403, title="Not allowed",
                     message=f"The token “{principal.name}” has the role {principal.role.value}; "
                             f"this page needs an {needed.value} token.")
    request.state.principal = principal
    return principal


def _login_redirect(request: Request, error: str | None = None) -> RedirectResponse:
    params = {"next": request.url.path + (f"?{request.url.query}" if request.url.query and not error else "")}
    if error:
        params["error"] = error
    return RedirectResponse(f"/login?{urlencode(params)}", status_code=303)


def _set_cookie(request: Request, response: Response, token: str) -> None:
    response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def _safe_next(value: str | None) -> str:
    """Only same-site paths: never ``//host`` or a full URL."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/studies"
    return value


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/studies", status_code=303)


@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", None, title="Sign in", next=_safe_next(request.query_params.get("next")),
                 error=request.query_params.get("error"))


@router.post("/login")
async def login(request: Request) -> Response:
    body = b""
    async for chunk in request.stream():  # read no more than a sign-in form can hold
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _page(request, "login.html", None, status=413, title="Sign in", next="/studies",
                         error="The form was too large.")
    form = parse_qs(body.decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or [""])[0])
    principal = context_of(request).tokens.identify(token)
    if principal is None:
        log.warning("dashboard sign-in refused from %s: unknown token", request.client.host if request.client else "?")
        return _page(request, "login.html", None, status=401, title="Sign in", next=target,
                     error="That token is not configured on this node.")
    response = RedirectResponse(target, status_code=303)
    _set_cookie(request, response, token)
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# -- pages -------------------------------------------------------------------------------------


@router.get("/studies")
def studies_page(request: Request) -> Response:
    who = _who(request)
    if isinstance(who, Response):
        return who
    params, problems = _parse(StudyQuery, request)
    if problems:
        return _page(request, "studies.html", who, status=422, title="Studies", page=None, problems=problems,
                     form=params, states=list(StudyState), classes=CLASS_ORDER)
    query = StudyQuery.model_validate(params)
    ctx = context_of(request)
    page = ctx.read(who, request, lambda s: list_studies(s, query), rows=lambda p: len(p.items),
                    criteria=query.described())
    return _page(request, "studies.html", who, title="Studies", page=page, problems=[], form=params,
                 states=list(StudyState), classes=CLASS_ORDER, links=_page_links(request, page))


@router.get("/studies/{study_uid}")
def study_page(request: Request, study_uid: str) -> Response:
    who = _who(request)
    if isinstance(who, Response):
        return who
    try:
        uid = check_uid(study_uid, "study_uid")
    except ValueError as exc:
        return _page(request, "error.html", who, status=422, title="Not a study UID", message=str(exc))
    ctx = context_of(request)
    study = ctx.read(who, request, lambda s: get_study(s, uid), rows=lambda d: 0 if d is None else 1 + len(d.instances),
                     study_uid=uid)
    if study is None:
        return _page(request, "error.html", who, status=404, title="Unknown study",
                     message=f"No study with Study Instance UID {uid} has been received.")
    overlays = {
        o.source_sop_uid: (o.sop_instance_uid, overlay_available(ctx.store_root, o.file_path))
        for i in study.instances for o in i.outputs if o.kind.value == "overlay" and o.removed_at is None
    }
    return _page(request, "study.html", who, title="Study", study=study, overlays=overlays)


@router.get("/queue")
def queue_page(request: Request) -> Response:
    who = _who(request)
    if isinstance(who, Response):
        return who
    params, problems = _parse(DeliveryQuery, request, default={"state": DeliveryState.DEAD.value})
    if problems:
        return _page(request, "error.html", who, status=422, title="Bad filter", problems=problems,
                     message="The queue view could not read its filter.")
    query = DeliveryQuery.model_validate(params)
    ctx = context_of(request)

    def load(session: Any) -> dict[str, Any]:
        kinds = ctx.settings.destination_kinds()
        return {"counts": status_counts(session), "page": list_deliveries(session, query, kinds),
                "by_kind": delivery_counts(session, kinds), "failed": failed_instances(session, 50)}

    data = ctx.read(who, request, load, rows=lambda d: len(d["page"].items) + len(d["failed"]),
                    criteria=query.described())
    return _page(request, "queue.html", who, title="Queue & deliveries", form=params, states=list(DeliveryState),
                 links=_page_links(request, data["page"]), **data)


@router.get("/audit")
def audit_page(request: Request) -> Response:
    who = _who(request, Role.AUDITOR)
    if isinstance(who, Response):
        return who
    params, problems = _parse(AuditQuery, request)
    if problems:
        return _page(request, "audit.html", who, status=422, title="Audit trail", page=None, problems=problems,
                     form=params, types=list(AuditEventType), chain=None)
    query = AuditQuery.model_validate(params)
    verify = request.query_params.get("verify") == "1"

    def load(session: Any) -> dict[str, Any]:
        return {"page": list_events(session, query), "chain": audit_chain.verify_chain(session) if verify else None}

    data = context_of(request).read(who, request, load, rows=lambda d: len(d["page"].items),
                                    criteria={**query.described(), **({"verify": True} if verify else {})})
    return _page(request, "audit.html", who, title="Audit trail", problems=[], form=params,
                 types=list(AuditEventType), links=_page_links(request, data["page"]), **data)


# -- helpers -----------------------------------------------------------------------------------


def _parse(model: type[BaseModel], request: Request,
           default: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Form fields (empty ones dropped) and the problems validating them as ``model``."""
    params: dict[str, Any] = dict(default or {})
    for key in set(request.query_params.keys()) - {"token", "verify"}:
        values = [v.strip() for v in request.query_params.getlist(key) if v.strip()]
        if key in model.model_fields and _is_list(model, key):
            params[key] = values
        elif values:
            params[key] = values[-1]
        else:
            params.pop(key, None)
    try:
        model.model_validate(params)
    except ValidationError as exc:
        return params, explain(exc)
    return params, []


def _is_list(model: type[BaseModel], key: str) -> bool:
    return "list" in str(model.model_fields[key].annotation)


def _page_links(request: Request, page: Any) -> dict[str, str | None]:
    def at(offset: int | None) -> str | None:
        if offset is None:
            return None
        params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("offset", "token")]
        return request.url.path + "?" + urlencode([*params, ("offset", str(offset))])

    previous = max(0, page.offset - page.limit) if page.offset > 0 else None
    return {"previous": at(previous), "next": at(page.next_offset)}


def _page(request: Request, template: str, who: Principal | None, *, status: int = 200, **context: Any) -> HTMLResponse:
    ctx: ApiContext = context_of(request)
    html = templates.get_template(template).render(
        who=who, path=request.url.path, now=datetime.now(timezone.utc), node=ctx.settings.dicom.ae_title, **context)
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _display_date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "—"


def _display_time(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _display_name(value: str | None) -> str:
    """DICOM PN ``Family^Given^Middle`` as ``Family, Given Middle``."""
    if not value:
        return "—"
    family, _, rest = value.partition("^")
    given = " ".join(p for p in rest.split("^")[:2] if p)
    return f"{family}, {given}" if given else family


def _class_name(value: str | None) -> str:
    try:
        return LesionClass(value).display_name if value else "—"
    except ValueError:
        return value or "—"


def _detail(value: str, limit: int = 160) -> str:
    """An audit detail's canonical JSON as ``key=value · key=value``, shortened for the table."""
    try:
        data = json.loads(value)
    except ValueError:
        return value[:limit]
    if not isinstance(data, dict):
        return value[:limit]
    text = " · ".join(
        f"{k}={json.dumps(v, ensure_ascii=False, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"
        for k, v in data.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_uid(value: str, keep: int = 12) -> str:
    return value if len(value) <= 2 * keep + 1 else f"{value[:keep]}…{value[-keep:]}"


templates.filters.update(da=_display_date, dt=_display_time, pn=_display_name, cls=_class_name, detail=_detail,
                         uidshort=_short_uid, pct=lambda v: f"{100 * float(v):.1f}%")
