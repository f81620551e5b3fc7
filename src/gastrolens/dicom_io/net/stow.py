"""The STOW-RS sender (PS3.18 10.5): each object in its own request, one result per object.

Objects go one a request over one HTTP session (kept-alive connections), so every
object gets its own answer and a failure never blurs into its neighbours: delivery
records each result before the next object goes, exactly as for a C-STORE association.
The request is made by ``dicomweb-client``; its own retrying is switched off, since the
delivery state machine owns backoff and ``dead``.

What an answer means:

- HTTP 2xx naming the object in ReferencedSOPSequence, or with no body: sent.
- The object in FailedSOPSequence (in a 2xx or 4xx answer): permanent, with its
  Failure Reason (0xA700 out of resources and 0xC000-range "cannot understand" alike:
  the peer judged the object, and sending it again unchanged will not change that).
- HTTP 408 and 429, every 5xx, timeouts and connection errors: retry.
- Any other 4xx (bad request, unauthorised, forbidden, unsupported media type,
  conflict): permanent; the peer refuses this request and would refuse it again.

A result's ``status`` is the HTTP status code, or the Failure Reason when the peer gave one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from gastrolens.config.schema import DicomWeb
from gastrolens.sending import SendOutcome, SendResult, permanent, retry, sent

log = logging.getLogger(__name__)

NO_ANSWER = "STOW-RS: no answer"

RETRIED_4XX = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})
"""The client errors that say "later" rather than "never"."""


@dataclass(frozen=True)
class StowObject:
    path: Path
    sop_instance_uid: str


def client_for(destination: DicomWeb, session: requests.Session | None = None) -> DICOMwebClient:
    """A dicomweb-client for ``destination``: its token, CA and timeout, no retrying of its own."""
    session = session or requests.Session()
    if destination.ca is not None:
        session.verify = str(destination.ca)
    headers = {}
    if destination.token is not None:
        headers["Authorization"] = f"Bearer {destination.token.get_secret_value()}"
    client = DICOMwebClient(destination.url, session=session, headers=headers,
                            timeout=destination.timeout_seconds)
    client.set_http_retry_params(retry=False)
    return client


def stow_files(objects: Sequence[StowObject], destination: DicomWeb) -> Iterator[SendResult]:
    """STOW-RS each object to ``destination``; yields one result per object, in order.

    When the server does not answer (timeout, refused or dropped connection), the objects
    after that one are not tried: each is retried later with the same reason, as when a
    DICOM association cannot be opened, so a dead server costs one timeout, not one each.
    """
    with requests.Session() as session:
        client = client_for(destination, session)
        for index, item in enumerate(objects):
            result = stow_one(client, item)
            yield result
            if result.reason is not None and result.reason.startswith(NO_ANSWER):
                yield from (retry(f"{result.reason} (not tried)") for _ in objects[index + 1:])
                return


def stow_one(client: DICOMwebClient, item: StowObject) -> SendResult:
    try:
        dataset = dcmread(item.path)
    except FileNotFoundError as exc:
        return permanent(f"output file missing: {exc}")
    except (InvalidDicomError, OSError) as exc:  # unreadable: sending it again will not help
        return permanent(f"cannot read {item.path}: {exc}")
    try:
        answer = client.store_instances([dataset])
    except requests.HTTPError as exc:
        return _http_error(exc, item.sop_instance_uid)
    except (requests.Timeout, requests.ConnectionError) as exc:
        return retry(f"{NO_ANSWER} ({exc.__class__.__name__}: {_short(exc)})")
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema) as exc:
        return permanent(f"STOW-RS: bad URL: {_short(exc)}")
    except requests.RequestException as exc:  # anything else of the transport: may pass later
        return retry(f"STOW-RS: {exc.__class__.__name__}: {_short(exc)}")
    except ValueError as exc:  # a 2xx whose body is neither DICOM JSON nor XML: not proof of storage
        return retry(f"STOW-RS: unreadable answer: {_short(exc)}")
    return judge_answer(answer, item.sop_instance_uid, HTTPStatus.OK)


def judge_answer(answer: Dataset, sop_instance_uid: str, http_status: int) -> SendResult:
    """What a STOW-RS response body says of one object (PS3.18 Table 10.5.3-1)."""
    for failed in answer.get("FailedSOPSequence", []):
        if failed.get("ReferencedSOPInstanceUID") == sop_instance_uid:
            reason = failed.get("FailureReason")
            code = f"0x{int(reason):04X}" if reason is not None else "no reason given"
            return permanent(f"STOW-RS: the peer refused the object (Failure Reason {code})",
                             status=int(reason) if reason is not None else http_status)
    referenced = answer.get("ReferencedSOPSequence", [])
    if any(item.get("ReferencedSOPInstanceUID") == sop_instance_uid for item in referenced):
        return sent(http_status)
    if "ReferencedSOPSequence" in answer or "FailedSOPSequence" in answer:
        return retry(f"STOW-RS: the answer does not name {sop_instance_uid}", status=http_status)
    return sent(http_status)  # a bare 200: the standard's success, without the optional body


def _http_error(exc: requests.HTTPError, sop_instance_uid: str) -> SendResult:
    response = exc.response
    if response is None:
        return retry(f"STOW-RS: {_short(exc)}")
    code = response.status_code
    body = _answer_body(response)
    if body is not None and "FailedSOPSequence" in body:
        judged = judge_answer(body, sop_instance_uid, code)
        if judged.outcome is not SendOutcome.SENT:
            return judged
    what = f"STOW-RS: HTTP {code} {response.reason or ''}".rstrip()
    if code >= 500 or code in RETRIED_4XX:
        return retry(what, status=code)
    return permanent(what, status=code)


def _answer_body(response: requests.Response) -> Dataset | None:
    """The DICOM JSON body of an error answer (the failed objects and why), if it has one."""
    if not response.content or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, KeyError, TypeError):  # not DICOM JSON: the status code alone decides
        return None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__
