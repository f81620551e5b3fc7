"""QIDO-RS and WADO-RS (PS3.18) over what GastroLens holds, so a web viewer (OHIF) can show it.

What is held is what DICOM Query/Retrieve answers with (:mod:`gastrolens.db.queries_qr`):
the current version of every received image still stored, and every output (SEG, SR,
overlay, study SR) still stored, so a SEG is shown over its source images. Reads need a
``viewer`` (or ``auditor``) token, and every one is audited as a query event.

* QIDO-RS: ``GET /dicomweb/studies``, ``/studies/{study}/series``,
  ``/studies/{study}/series/{series}/instances``, ``/studies/{study}/instances`` with the
  matching keys C-FIND takes (by keyword or tag: StudyInstanceUID, PatientID,
  PatientName, AccessionNumber, StudyDate as a date or a range, ModalitiesInStudy or
  Modality, SeriesInstanceUID, SOPInstanceUID, SOPClassUID; ``*`` and ``?`` wildcards),
  ``limit`` and ``offset``; other keys are ignored. DICOM JSON, UTF-8.
* WADO-RS: a study, series or instance as ``multipart/related; type="application/dicom"``
  (each file exactly as stored, in its stored transfer syntax); ``.../metadata`` as DICOM
  JSON without bulk data (a BulkDataURI names the instance); ``.../frames/{n[,m...]}``:
  native frames as ``application/octet-stream``, compressed ones as stored (``image/jpeg``,
  ``image/jls``, ``image/jp2`` when accepted, else octet-stream naming the transfer syntax).
  Frames of a bit-packed (1-bit) image are not split out: retrieve the instance.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from sqlalchemy.orm import Session

from gastrolens.api.auth import Principal
from gastrolens.api.context import ApiError, context_of
from gastrolens.api.routes_data import Viewer
from gastrolens.api.stow_response import DICOM_JSON, dicomweb_root
from gastrolens.db.filters import check_uid
from gastrolens.db.queries_qr import (
    HeldObject,
    HeldSeries,
    HeldStudy,
    ObjectQuery,
    find_objects,
    find_series,
    find_studies,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

MAX_LIMIT = 1000
BULK_DATA_THRESHOLD = 1024
COMPRESSED_FRAME_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
}
_KEYS = {  # QIDO matching keys: tag -> keyword
    "0020000D": "StudyInstanceUID", "00100020": "PatientID", "00100010": "PatientName",
    "00080050": "AccessionNumber", "00080020": "StudyDate", "00080061": "ModalitiesInStudy",
    "00080060": "Modality", "0020000E": "SeriesInstanceUID", "00080018": "SOPInstanceUID",
    "00080016": "SOPClassUID",
}
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")


# -- QIDO-RS ------------------------------------------------------------------------------------


@router.get("/studies", summary="QIDO-RS: search studies")
def search_studies(request: Request, principal: Viewer) -> Response:
    query, limit, offset = _qido(request, "STUDY")
    found = _read(request, principal, lambda s: find_studies(s, query), criteria=_criteria(request))
    return _json([_study_json(request, s) for s in found[offset:offset + limit]])


@router.get("/studies/{study}/series", summary="QIDO-RS: search a study's series")
def search_series(study: str, request: Request, principal: Viewer) -> Response:
    query, limit, offset = _qido(request, "SERIES", study=study)
    found = _read(request, principal, lambda s: find_series(s, query), criteria=_criteria(request), study=study)
    return _json([_series_json(request, s) for s in found[offset:offset + limit]])


@router.get("/studies/{study}/instances", summary="QIDO-RS: search a study's instances")
def search_study_instances(study: str, request: Request, principal: Viewer) -> Response:
    return _search_instances(request, principal, study, None)


@router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search a series' instances")
def search_series_instances(study: str, series: str, request: Request, principal: Viewer) -> Response:
    return _search_instances(request, principal, study, series)


def _search_instances(request: Request, principal: Principal, study: str, series: str | None) -> Response:
    query, limit, offset = _qido(request, "IMAGE", study=study, series=series)
    found = _read(request, principal, lambda s: find_objects(s, query), criteria=_criteria(request), study=study)
    return _json([_instance_json(request, o) for o in found[offset:offset + limit]])


# -- WADO-RS ------------------------------------------------------------------------------------


@router.get("/studies/{study}", summary="WADO-RS: a study's instances", response_class=Response)
def retrieve_study(study: str, request: Request, principal: Viewer) -> Response:
    return _multipart_instances(request, _objects(request, principal, study))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: a series' instances", response_class=Response)
def retrieve_series(study: str, series: str, request: Request, principal: Viewer) -> Response:
    return _multipart_instances(request, _objects(request, principal, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: one instance",
            response_class=Response)
def retrieve_instance(study: str, series: str, sop: str, request: Request, principal: Viewer) -> Response:
    return _multipart_instances(request, _objects(request, principal, study, series, sop))


@router.get("/studies/{study}/metadata", summary="WADO-RS: a study's metadata")
def study_metadata(study: str, request: Request, principal: Viewer) -> Response:
    return _metadata(request, _objects(request, principal, study))


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: a series' metadata")
def series_metadata(study: str, series: str, request: Request, principal: Viewer) -> Response:
    return _metadata(request, _objects(request, principal, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata", summary="WADO-RS: an instance's metadata")
def instance_metadata(study: str, series: str, sop: str, request: Request, principal: Viewer) -> Response:
    return _metadata(request, _objects(request, principal, study, series, sop))


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", summary="WADO-RS: frames",
            response_class=Response)
def retrieve_frames(study: str, series: str, sop: str, frames: str, request: Request, principal: Viewer) -> Response:
    numbers = _frame_numbers(frames)
    held = _objects(request, principal, study, series, sop)
    ds = _load(request, held[0])
    if ds is None:
        raise ApiError(404, f"instance {sop} is no longer stored")
    try:
        parts = frame_parts(ds, numbers, accept=request.headers.get("accept", ""))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc
    boundary = uuid.uuid4().hex
    kinds = {kind.split(";")[0] for kind, _ in parts}
    body = b"".join(_part(data, kind, boundary) for kind, data in parts) + _closing(boundary)
    return Response(body, media_type=f'multipart/related; type="{kinds.pop() if len(kinds) == 1 else "*"}"; '
                                     f"boundary={boundary}")


def frame_parts(ds: Dataset, numbers: Sequence[int], *, accept: str = "") -> list[tuple[str, bytes]]:
    """(Content-Type, bytes) of each 1-based frame of ``ds``; ValueError for a frame it does not have.

    A compressed frame is labelled with its image media type (``image/jpeg``...) when ``accept``
    names it, else as ``application/octet-stream`` with its transfer syntax (what a viewer that
    accepts ``transfer-syntax=*`` expects).
    """
    if "PixelData" not in ds:
        raise ValueError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    for n in numbers:
        if not 1 <= n <= count:
            raise ValueError(f"frame {n} does not exist: the instance has {count} frame(s)")
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        image_type = COMPRESSED_FRAME_TYPES.get(str(syntax))
        kind = (image_type if image_type and image_type in accept.lower()
                else f"application/octet-stream; transfer-syntax={syntax}")
        return [(kind, get_frame(ds.PixelData, n - 1, number_of_frames=count)) for n in numbers]
    if int(ds.BitsAllocated) == 1:
        raise ValueError("frames of a bit-packed (1-bit) image are not split out: retrieve the instance")
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated) // 8
    pixels = ds.PixelData
    return [("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", pixels[(n - 1) * size:n * size])
            for n in numbers]


# -- helpers ------------------------------------------------------------------------------------


def _read(request: Request, principal: Principal, query: Callable[[Session], list[Any]], *,
          criteria: dict[str, str], study: str | None = None) -> list[Any]:
    return context_of(request).read(principal, request, query, rows=len, criteria=criteria, study_uid=study)


def _qido(request: Request, level: str, *, study: str | None = None,
          series: str | None = None) -> tuple[ObjectQuery, int, int]:
    params = {(_KEYS.get(k.upper(), k)): v for k, v in request.query_params.items()}
    for uid in (study, series):
        if uid is not None:
            _uid(uid)
    date_from, date_to = _date_range(params.get("StudyDate"))
    modalities = params.get("Modality") or params.get("ModalitiesInStudy")
    query = ObjectQuery(
        level=level,
        study_uids=(study,) if study else _uids(params.get("StudyInstanceUID")),
        series_uids=(series,) if series else _uids(params.get("SeriesInstanceUID")),
        sop_uids=_uids(params.get("SOPInstanceUID")),
        patient_id=params.get("PatientID") or None,
        patient_name=params.get("PatientName") or None,
        accession_number=params.get("AccessionNumber") or None,
        date_from=date_from,
        date_to=date_to,
        modalities=tuple(m for m in (modalities or "").replace("\\", ",").split(",") if m),
        sop_class_uid=params.get("SOPClassUID") or None,
    )
    return query, _int(params.get("limit"), "limit", MAX_LIMIT, 1), _int(params.get("offset"), "offset", 0, 0)


def _criteria(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items() if k in _KEYS.values() or k.upper() in _KEYS}


def _uid(value: str) -> str:
    try:
        return check_uid(value)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc


def _uids(value: str | None) -> tuple[str, ...]:
    return tuple(_uid(v) for v in (value or "").replace("\\", ",").split(",") if v)


def _int(value: str | None, name: str, default: int, minimum: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or int(value) < minimum:
        raise ApiError(400, f"{name}: {value[:20]!r} is not a whole number of at least {minimum}")
    return min(int(value), MAX_LIMIT) if name == "limit" else int(value)


def _date_range(value: str | None) -> tuple[date | None, date | None]:
    if not value:
        return None, None
    match = _DATE.match(value)
    if match is None or not (match.group(1) or match.group(3)):
        raise ApiError(400, f"StudyDate: {value[:40]!r} is not YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    try:
        first = date(int(value[:4]), int(value[4:6]), int(value[6:8])) if match.group(1) else None
        last_text = match.group(3) if match.group(2) else match.group(1)
        last = date(int(last_text[:4]), int(last_text[4:6]), int(last_text[6:8])) if last_text else None
    except ValueError as exc:
        raise ApiError(400, f"StudyDate: {value[:40]!r}: {exc}") from exc
    return first, last


def _frame_numbers(frames: str) -> list[int]:
    numbers = [n.strip() for n in frames.split(",")]
    if not numbers or not all(n.isdigit() and int(n) >= 1 for n in numbers):
        raise ApiError(400, f"frames: {frames[:40]!r} is not a list of frame numbers from 1")
    return [int(n) for n in numbers]


def _objects(request: Request, principal: Principal, study: str, series: str | None = None,
             sop: str | None = None) -> list[HeldObject]:
    query = ObjectQuery(level="IMAGE", study_uids=(_uid(study),), series_uids=(_uid(series),) if series else (),
                        sop_uids=(_uid(sop),) if sop else ())
    found: list[HeldObject] = _read(request, principal, lambda s: find_objects(s, query), criteria={}, study=study)
    if not found:
        raise ApiError(404, f"nothing held under {request.url.path.removeprefix('/dicomweb')}")
    return found


def _path(request: Request, held: HeldObject) -> Path:
    return context_of(request).store_root / held.file_path


def _load(request: Request, held: HeldObject) -> Dataset | None:
    try:
        return dcmread(_path(request, held))
    except FileNotFoundError:
        log.warning("WADO-RS: %s is held but its file %s is gone", held.sop_uid, held.file_path)
        return None


def _multipart_instances(request: Request, held: list[HeldObject]) -> Response:
    files = [p for p in (_path(request, h) for h in held) if p.is_file()]
    if not files:
        raise ApiError(404, "the files are no longer stored")
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for path in files:
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # removed by retention after the query
                continue
            yield _part(data, "application/dicom", boundary)
        yield _closing(boundary)

    return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


def _metadata(request: Request, held: list[HeldObject]) -> Response:
    items = []
    for h in held:
        ds = _load(request, h)
        if ds is None:
            continue
        url = _instance_url(request, h)
        items.append(ds.to_json_dict(bulk_data_threshold=BULK_DATA_THRESHOLD,
                                     bulk_data_element_handler=_bulk_uri(url)))
    return _json(items)


def _bulk_uri(url: str) -> Callable[[DataElement], str]:
    return lambda _element: url


def _part(data: bytes, kind: str, boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"


def _closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode()


def _json(items: list[dict[str, Any]]) -> Response:
    return Response(json.dumps(items), media_type=DICOM_JSON)


def _base(request: Request) -> str:
    return dicomweb_root(context_of(request).settings.api.public_url, str(request.base_url))


def _instance_url(request: Request, o: HeldObject) -> str:
    return f"{_base(request)}/studies/{o.study.study_uid}/series/{o.series_uid}/instances/{o.sop_uid}"


def _attributes(values: Sequence[tuple[str, str, Any]]) -> dict[str, Any]:
    """DICOM JSON of (tag, VR, value) triples; None or empty values become empty attributes."""
    out: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    for tag, vr, value in values:
        if value is None or value == () or value == "":
            out[tag] = {"vr": vr}
        elif vr == "PN":
            out[tag] = {"vr": vr, "Value": [{"Alphabetic": value}]}
        else:
            out[tag] = {"vr": vr, "Value": list(value) if isinstance(value, tuple) else [value]}
    return out


def _study_values(s: HeldStudy) -> list[tuple[str, str, Any]]:
    return [("00080020", "DA", s.study_date), ("00080050", "SH", s.accession_number),
            ("00080061", "CS", s.modalities), ("00081030", "LO", s.study_description),
            ("00100010", "PN", s.patient_name), ("00100020", "LO", s.patient_id),
            ("0020000D", "UI", s.study_uid)]


def _study_json(request: Request, s: HeldStudy) -> dict[str, Any]:
    return _attributes([*_study_values(s), ("00201206", "IS", s.series), ("00201208", "IS", s.objects),
                        ("00081190", "UR", f"{_base(request)}/studies/{s.study_uid}")])


def _series_json(request: Request, s: HeldSeries) -> dict[str, Any]:
    return _attributes([*_study_values(s.study), ("00080060", "CS", s.modality),
                        ("0020000E", "UI", s.series_uid), ("00200011", "IS", s.series_number),
                        ("00201209", "IS", s.objects),
                        ("00081190", "UR", f"{_base(request)}/studies/{s.study.study_uid}/series/{s.series_uid}")])


def _instance_json(request: Request, o: HeldObject) -> dict[str, Any]:
    return _attributes([*_study_values(o.study), ("00080060", "CS", o.modality), ("0020000E", "UI", o.series_uid),
                        ("00080016", "UI", o.sop_class_uid), ("00080018", "UI", o.sop_uid),
                        ("00081190", "UR", _instance_url(request, o))])
