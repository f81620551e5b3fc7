"""STOW-RS receiving (PS3.18 Store Instances): ``POST /dicomweb/studies[/{study}]``.

A sender's token (role ``sender``; viewers and auditors may not store) posts
``multipart/related; type="application/dicom"``, one Part 10 instance per part. The
body is spooled to disk while the limits (``[api] stow_max_body_bytes``,
``stow_max_parts``) are checked (413 before anything is stored,
:mod:`gastrolens.api.multipart`); then each part goes through the very ingest a
C-STORE goes through (:class:`~gastrolens.dicom_io.net.received.Ingest`, the daemon's
``DatabaseIngest``): the same header checks, fsync and rename, row and audit event
committed, the same duplicate and version rules, the same quarantine with its reason.
Only then is the answer written: the instances it lists as stored are durable.

The audit trail names the sender ``dicomweb:<token name>@<address>``; instance rows
carry ``STOW-RS`` where a C-STORE's carry the calling AE title. An instance of another
study than the one addressed is quarantined (0xA900), and so is a SOP class that
``[dicom] accepted_sop_classes`` does not list (0x0122), as C-STORE would refuse it.

A part that starts with its File Meta Information but without the 128-byte preamble and
``DICM`` (``dicomweb-client`` and pydicom's ``dcmwrite`` without ``enforce_file_format``
send them so) gets an empty preamble in front, so that every stored file is a Part 10
file; its data set and meta are kept byte for byte.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydicom import dcmread
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from gastrolens import metrics
from gastrolens.api.auth import Principal, Role
from gastrolens.api.context import ApiContext, ApiError, authorize, context_of
from gastrolens.api.multipart import BodyError, Part, SpooledParts, boundary_of
from gastrolens.api.routes_data import Credentials
from gastrolens.api.stow_response import DICOM_JSON, DICOM_XML, build_response, dicomweb_root, to_xml, wants_xml
from gastrolens.db import audit
from gastrolens.db.filters import check_uid
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.dicom_io.net.received import Ingest, IngestOutcome, ReceivedInstance, RequestFacts
from gastrolens.errors import GastroLensError
from gastrolens.storage.store import INCOMING

log = logging.getLogger(__name__)

PARALLEL_PARTS = 4
"""Parts of one request in the ingest at once (see :func:`_ingest_all`)."""
PART10_PREFIX = bytes(128) + b"DICM"
SOURCE = "STOW-RS"
"""What an instance row records where a C-STORE's records the calling AE title."""

router = APIRouter(tags=["dicomweb"])


def sender(request: Request, credentials: Credentials) -> Principal:
    return authorize(request, credentials, Role.SENDER)


Sender = Annotated[Principal, Depends(sender)]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored", "content": {DICOM_JSON: {}, DICOM_XML: {}}},
    202: {"description": "some instances stored, some failed (FailedSOPSequence says which and why)"},
    400: {"description": "the body is not multipart/related, or holds no instance"},
    401: {"description": "no token, or an unknown one"},
    403: {"description": "the token's role is not sender"},
    409: {"description": "no instance stored (FailedSOPSequence says why)"},
    413: {"description": "the body is larger than api.stow_max_body_bytes or has more than api.stow_max_parts parts"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
}


@router.post("/dicomweb/studies", summary="STOW-RS: store instances of any study", responses=_RESPONSES,
             response_class=Response)
async def store_instances(request: Request, principal: Sender) -> Response:
    return await _store(request, principal, None)


@router.post("/dicomweb/studies/{study}", summary="STOW-RS: store instances of one study", responses=_RESPONSES,
             response_class=Response)
async def store_study_instances(study: str, request: Request, principal: Sender) -> Response:
    try:
        check_uid(study, "study")
    except ValueError as exc:
        raise ApiError(400, str(exc), errors=[{"field": "study", "message": str(exc)}]) from exc
    return await _store(request, principal, study)


async def _store(request: Request, principal: Principal, study: str | None) -> Response:
    ctx = context_of(request)
    if ctx.ingest is None:
        raise ApiError(503, "this process does not store instances (STOW-RS is served by the daemon's API)")
    address = request.client.host if request.client else ""
    facts = RequestFacts(actor=f"dicomweb:{principal.name}@{address}", calling_ae=SOURCE, peer_address=address,
                         requested_sop_uid=None)
    try:
        body = _spool(request, ctx)
        try:
            async for chunk in request.stream():  # parsed and written off the event loop
                await run_in_threadpool(body.write, chunk)
            parts = body.finish()
            outcomes = await run_in_threadpool(_ingest_all, ctx.ingest, body, facts, study,
                                               frozenset(ctx.settings.dicom.accepted_sop_classes))
        finally:
            body.close()
    except ClientDisconnect as exc:
        await run_in_threadpool(_audit_refusal, ctx, facts, study, 400, "the client went away before the body ended")
        raise ApiError(400, "the client went away before the body ended") from exc
    except BodyError as exc:
        await run_in_threadpool(_audit_refusal, ctx, facts, study, exc.status, exc.message)
        raise ApiError(exc.status, exc.message) from exc
    root = dicomweb_root(ctx.settings.api.public_url, str(request.base_url))
    answer = build_response(outcomes, base_url=root, study=study)
    failed = len(answer.dataset.FailedSOPSequence)
    log.info("STOW-RS from %s: %d part(s), %d stored, %d failed", facts.actor, len(parts), len(parts) - failed,
             failed)
    if wants_xml(request.headers.get("accept")):
        return Response(to_xml(answer.dataset), status_code=answer.status, media_type=DICOM_XML)
    return Response(json.dumps(answer.dataset.to_json_dict()), status_code=answer.status, media_type=DICOM_JSON)


def _spool(request: Request, ctx: ApiContext) -> SpooledParts:
    """The body's spool, or BodyError when the headers alone already refuse the request."""
    limits = ctx.settings.api
    boundary = boundary_of(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.stow_max_body_bytes:
        raise BodyError(413, f"the request body of {declared} bytes exceeds api.stow_max_body_bytes "
                             f"({limits.stow_max_body_bytes} bytes)")
    return SpooledParts(boundary, limits.stow_max_body_bytes, limits.stow_max_parts, folder=ctx.store_root / INCOMING)


def _ingest_all(ingest: Ingest, body: SpooledParts, facts: RequestFacts, study: str | None,
                accepted: frozenset[str]) -> list[IngestOutcome]:
    """Each part through the ingest; the ingest answers and audits every one. The outcomes are in
    the parts' order.

    Parts go through ``PARALLEL_PARTS`` at a time, as that many C-STORE associations would (one
    part's fsyncs overlap another's header check and commit), when their SOP Instance UIDs are
    all distinct; a request that sends one UID twice (a correction after the original) goes one
    part after the other, so its versions are numbered in the order sent.
    """
    def one(part: Part) -> IngestOutcome:
        return _ingest_one(ingest, as_part10(body.read(part)), facts, study, accepted)

    if len(body.parts) < 2 or not _distinct_instances(body):
        return [one(part) for part in body.parts]
    with ThreadPoolExecutor(max_workers=PARALLEL_PARTS, thread_name_prefix="gastrolens-stow") as pool:
        return list(pool.map(one, body.parts))


def _distinct_instances(body: SpooledParts) -> bool:
    """Whether every part names a SOP Instance UID of its own (False when one cannot be read)."""
    seen: set[str] = set()
    for part in body.parts:
        try:
            uid = dcmread(BytesIO(as_part10(body.read(part))), stop_before_pixels=True,
                          specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID")
        except Exception:  # unreadable here: the ingest will judge it; stay sequential to be safe
            return False
        if not uid or str(uid) in seen:
            return False
        seen.add(str(uid))
    return True


def as_part10(data: bytes) -> bytes:
    """``data`` with the preamble and ``DICM`` prefix when it starts with a bare group 0002 element."""
    if data[128:132] != PART10_PREFIX[128:] and data[:2] == b"\x02\x00":
        return PART10_PREFIX + data
    return data


def _ingest_one(ingest: Ingest, data: bytes, facts: RequestFacts, study: str | None,
                accepted: frozenset[str]) -> IngestOutcome:
    with metrics.stage_cpu(metrics.Stage.RECEIVE):
        received: ReceivedInstance | None = None
        try:
            received = ReceivedInstance(
                data=data,
                actor=facts.actor,
                calling_ae=facts.calling_ae,
                peer_address=facts.peer_address,
                negotiated_sop_class=None,
                requested_sop_uid=None,
                expected_study_uid=study,
                accepted_sop_classes=accepted,
            )
            return ingest.ingest(received)
        except Exception as exc:  # the receiver's last-resort guard: keep the bytes, audit, answer
            log.exception("unexpected error storing a STOW-RS part from %s", facts.actor)
            return ingest.last_resort(received, facts, exc)


def _audit_refusal(ctx: ApiContext, facts: RequestFacts, study: str | None, status: int, reason: str) -> None:
    """A request refused whole (nothing stored): the sender heard ``status``."""
    try:
        with ctx.db.session() as session:
            audit.record(session, audit.Event(
                type=AuditEventType.STORE_REFUSED,
                actor=facts.actor,
                outcome=Outcome.FAILURE,
                study_uid=study,
                detail={"reason": reason, "http_status": status, "source": SOURCE},
            ))
    except GastroLensError as exc:
        log.error("could not audit a refused STOW-RS request from %s: %s", facts.actor, exc)
