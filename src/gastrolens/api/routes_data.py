"""The read-only JSON API: studies, instances, deliveries, the audit trail, overlay thumbnails.

Every route needs a token (``viewer``; ``/api/audit`` needs ``auditor``) and every
answer is audited through :meth:`ApiContext.read`. Query strings are validated by
the filter models of :mod:`gastrolens.db.filters`; a bad one is a 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials

from gastrolens.api.auth import Principal, Role
from gastrolens.api.context import ApiError, authorize, bearer_scheme, context_of
from gastrolens.api.thumbnails import overlay_png
from gastrolens.db.filters import AuditQuery, DeliveryQuery, StudyQuery, check_uid
from gastrolens.db.queries_audit import list_events
from gastrolens.db.queries_queue import list_deliveries
from gastrolens.db.queries_studies import get_instance, get_study, list_studies, overlay_file
from gastrolens.db.views import AuditRow, InstanceView, Page, QueueDeliveryView, StudyDetail, StudySummary

Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


def viewer(request: Request, credentials: Credentials) -> Principal:
    return authorize(request, credentials, Role.VIEWER)


def auditor(request: Request, credentials: Credentials) -> Principal:
    return authorize(request, credentials, Role.AUDITOR)


Viewer = Annotated[Principal, Depends(viewer)]
Auditor = Annotated[Principal, Depends(auditor)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "no token, or an unknown one"},
    403: {"description": "the token's role does not allow this"},
    422: {"description": "a malformed parameter; the message names it"},
}
router = APIRouter(prefix="/api", responses=_ERRORS)


def valid_uid(value: str, name: str) -> str:
    try:
        return check_uid(value, name)
    except ValueError as exc:
        raise ApiError(422, str(exc), errors=[{"field": name, "message": str(exc)}]) from exc


@router.get("/studies", response_model=Page[StudySummary], tags=["studies"],
            summary="Studies, most recently received first")
def studies(request: Request, principal: Viewer, query: Annotated[StudyQuery, Query()]) -> Page[StudySummary]:
    return context_of(request).read(principal, request, lambda s: list_studies(s, query),
                                    rows=lambda page: len(page.items), criteria=query.described())


@router.get("/studies/{study_uid}", response_model=StudyDetail, tags=["studies"],
            summary="A study: its images, per-image results, outputs and their deliveries",
            responses={404: {"description": "no such study"}})
def study(request: Request, principal: Viewer, study_uid: str) -> StudyDetail:
    uid = valid_uid(study_uid, "study_uid")
    found = context_of(request).read(principal, request, lambda s: get_study(s, uid),
                                     rows=lambda d: 0 if d is None else 1 + len(d.instances), study_uid=uid)
    if found is None:
        raise ApiError(404, f"no study with Study Instance UID {uid}")
    return found


@router.get("/instances/{sop_uid}", response_model=InstanceView, tags=["studies"],
            summary="The latest version of a received image, its results and outputs",
            responses={404: {"description": "no such instance"}})
def instance(request: Request, principal: Viewer, sop_uid: str) -> InstanceView:
    uid = valid_uid(sop_uid, "sop_uid")
    found = context_of(request).read(principal, request, lambda s: get_instance(s, uid),
                                     rows=lambda i: 0 if i is None else 1, sop_uid=uid)
    if found is None:
        raise ApiError(404, f"no instance with SOP Instance UID {uid}")
    return found


@router.get("/deliveries", response_model=Page[QueueDeliveryView], tags=["queue"],
            summary="Deliveries of outputs to destinations, most recently changed first")
def deliveries(request: Request, principal: Viewer,
               query: Annotated[DeliveryQuery, Query()]) -> Page[QueueDeliveryView]:
    ctx = context_of(request)
    kinds = ctx.settings.destination_kinds()
    return ctx.read(principal, request, lambda s: list_deliveries(s, query, kinds),
                    rows=lambda page: len(page.items), criteria=query.described())


@router.get("/audit", response_model=Page[AuditRow], tags=["audit"],
            summary="Audit events (auditor role); newest first unless order=asc")
def audit_events(request: Request, principal: Auditor, query: Annotated[AuditQuery, Query()]) -> Page[AuditRow]:
    return context_of(request).read(principal, request, lambda s: list_events(s, query),
                                    rows=lambda page: len(page.items), criteria=query.described())


@router.get(
    "/overlays/{sop_uid}.png",
    tags=["studies"],
    response_class=Response,
    summary="An overlay output as a PNG thumbnail",
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such overlay, or its file is gone"}},
)
def overlay(
    request: Request,
    principal: Viewer,
    sop_uid: str,
    size: Annotated[int, Query(ge=32, le=1024, description="longest side in pixels")] = 320,
) -> Response:
    uid = valid_uid(sop_uid, "sop_uid")
    ctx = context_of(request)
    path = ctx.read(
        principal,
        request,
        lambda s: overlay_file(s, uid),
        rows=lambda p: 0 if p is None else 1,
        sop_uid=uid,
        criteria={"size": size},
    )
    if path is None:
        raise ApiError(404, f"no overlay with SOP Instance UID {uid}")
    png = overlay_png(ctx.store_root, path, size)
    if png is None:
        raise ApiError(404, f"the overlay {uid} is no longer stored or cannot be decoded")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})
