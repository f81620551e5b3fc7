"""Modality Performed Procedure Step SCP (PS3.4 Annex F): N-CREATE and N-SET.

The workstation creates a step (N-CREATE, status IN PROGRESS) when a procedure starts
and sets it COMPLETED or DISCONTINUED (N-SET) when it ends, listing the images it made
in the Performed Series Sequence. This module checks the DICOM side (required
attributes, status values) and hands the step to the daemon's :class:`ProcedureStepBook`,
which stores it, audits it, decides the state transition (it holds the state, shared
by every receiver process) and, on a final state, records the completion signal for
the study. Statuses (PS3.4 F.7.2, meanings from PS3.7 C): 0x0120 missing attribute,
0x0121 missing attribute value (a Type 1 attribute sent empty), 0x0106 invalid
attribute value, 0x0111 duplicate SOP instance, 0x0112 no such object instance,
0x0110 processing failure ("Performed Procedure Step Object may no longer be updated"
for an N-SET on a step already COMPLETED or DISCONTINUED).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET

from gastrolens.dicom_io.net.services import (
    MODALITY_PERFORMED_PROCEDURE_STEP,
    STATUS_PROCESSING_FAILURE,
    requestor,
    status_dataset,
)

log = logging.getLogger(__name__)

STATUS_MISSING_ATTRIBUTE = 0x0120
STATUS_MISSING_ATTRIBUTE_VALUE = 0x0121
STATUS_INVALID_ATTRIBUTE_VALUE = 0x0106
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_NO_SUCH_OBJECT_INSTANCE = 0x0112
NO_LONGER_UPDATABLE = "Performed Procedure Step Object may no longer be updated"
NO_LONGER_UPDATABLE_ERROR_ID = 0xA710

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"

REQUIRED_ON_CREATE = (
    "ScheduledStepAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedStationAETitle",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "PerformedProcedureStepStatus",
    "Modality",
)
"""Type 1 for N-CREATE in PS3.4 Table F.7.2-1 (the ones GastroLens relies on, and the step's identity)."""


class StepAnswer(str, enum.Enum):
    """What the book made of a create or update."""

    DONE = "done"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"
    FINAL = "final"
    """The step is already COMPLETED or DISCONTINUED."""


@dataclass(frozen=True, kw_only=True)
class StepRequest:
    """One N-CREATE or N-SET, as the book needs it."""

    sop_instance_uid: str
    actor: str
    calling_ae: str
    peer_address: str
    attributes: Dataset
    """N-CREATE: the Attribute List; N-SET: the Modification List."""
    status: str | None = None
    """The Performed Procedure Step Status in the request, if any."""
    study_instance_uid: str | None = None
    """N-CREATE: from the Scheduled Step Attributes Sequence."""
    referenced: tuple[str, ...] | None = None
    """SOP Instance UIDs of the Performed Series Sequence, when the request carries it."""
    detail: dict[str, Any] = field(default_factory=dict)


class ProcedureStepBook(Protocol):
    """The daemon's side: the stored steps, their audit, the completion signal."""

    def create(self, request: StepRequest) -> StepAnswer:
        """Store a new step (IN PROGRESS) and audit it; DUPLICATE when the UID exists."""
        ...

    def update(self, request: StepRequest) -> StepAnswer:
        """Apply an N-SET; on COMPLETED / DISCONTINUED signal the study's completion. Audited."""
        ...

    def refused(self, *, operation: str, actor: str, sop_instance_uid: str | None, status: int,
                reason: str) -> None:
        """Audit a request refused before it reached the book. Must not raise."""
        ...


class ProcedureStepSCP:
    """The service: bind :meth:`handlers` on the receiver (see ``dicom_io.net.services``)."""

    sop_classes = (MODALITY_PERFORMED_PROCEDURE_STEP,)

    def __init__(self, book: ProcedureStepBook) -> None:
        self.book = book

    def handlers(self) -> Sequence[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_N_CREATE, self.on_create), (evt.EVT_N_SET, self.on_set)]

    def close(self) -> None:
        return None  # nothing runs in the background

    # -- N-CREATE ----------------------------------------------------------------------

    def on_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        return self._guarded("N-CREATE", event, cast(N_CREATE, event.request).AffectedSOPInstanceUID, self._create)

    def _create(self, event: evt.Event, calling_ae: str, actor: str,
                sop_uid: str | None) -> tuple[int | Dataset, Dataset | None]:
        attributes = event.attribute_list
        missing = [k for k in REQUIRED_ON_CREATE if k not in attributes]
        empty = [k for k in REQUIRED_ON_CREATE if k in attributes and attributes[k].value in (None, "", [])]
        scheduled = attributes.get("ScheduledStepAttributesSequence") or []
        study_uid = next((str(i.StudyInstanceUID) for i in scheduled if i.get("StudyInstanceUID")), None)
        if study_uid is None and "ScheduledStepAttributesSequence" not in missing + empty:
            missing.append("ScheduledStepAttributesSequence > StudyInstanceUID")
        if missing:
            return self._refuse("N-CREATE", actor, sop_uid, STATUS_MISSING_ATTRIBUTE,
                                f"missing required attribute(s): {', '.join(missing)}")
        if empty:
            return self._refuse("N-CREATE", actor, sop_uid, STATUS_MISSING_ATTRIBUTE_VALUE,
                                f"empty required attribute(s): {', '.join(empty)}")
        status = str(attributes.PerformedProcedureStepStatus).strip()
        if status != IN_PROGRESS:
            return self._refuse("N-CREATE", actor, sop_uid, STATUS_INVALID_ATTRIBUTE_VALUE,
                                f"Performed Procedure Step Status {status!r} must be IN PROGRESS on N-CREATE")
        response = Dataset()
        if sop_uid is None:  # the SCP names the step (PS3.4 F.7.2.1.2)
            sop_uid = generate_uid()
            response.AffectedSOPInstanceUID = sop_uid
        request = StepRequest(sop_instance_uid=sop_uid, actor=actor, calling_ae=calling_ae,
                              peer_address=event.assoc.requestor.address, attributes=attributes,
                              status=status, study_instance_uid=study_uid,
                              referenced=referenced_instances(attributes))
        if self.book.create(request) is StepAnswer.DUPLICATE:
            return status_dataset(STATUS_DUPLICATE_SOP_INSTANCE, f"procedure step {sop_uid} already exists"), None
        log.info("MPPS %s IN PROGRESS for study %s from %s", sop_uid, study_uid, actor)
        return 0x0000, response or None

    # -- N-SET -------------------------------------------------------------------------

    def on_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        return self._guarded("N-SET", event, cast(N_SET, event.request).RequestedSOPInstanceUID, self._set)

    def _set(self, event: evt.Event, calling_ae: str, actor: str,
             sop_uid: str | None) -> tuple[int | Dataset, Dataset | None]:
        if sop_uid is None:
            return self._refuse("N-SET", actor, None, STATUS_NO_SUCH_OBJECT_INSTANCE, "no Requested SOP Instance UID")
        changes = event.modification_list
        status = None
        if "PerformedProcedureStepStatus" in changes:
            status = str(changes.PerformedProcedureStepStatus or "").strip()
            if status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
                return self._refuse("N-SET", actor, sop_uid, STATUS_INVALID_ATTRIBUTE_VALUE,
                                    f"Performed Procedure Step Status {status!r} is not IN PROGRESS, "
                                    "COMPLETED or DISCONTINUED")
        request = StepRequest(sop_instance_uid=sop_uid, actor=actor, calling_ae=calling_ae,
                              peer_address=event.assoc.requestor.address, attributes=changes, status=status,
                              referenced=referenced_instances(changes))
        answer = self.book.update(request)
        if answer is StepAnswer.UNKNOWN:
            return status_dataset(STATUS_NO_SUCH_OBJECT_INSTANCE, f"no procedure step {sop_uid}"), None
        if answer is StepAnswer.FINAL:
            return status_dataset(STATUS_PROCESSING_FAILURE, NO_LONGER_UPDATABLE, NO_LONGER_UPDATABLE_ERROR_ID), None
        log.info("MPPS %s set%s by %s", sop_uid, f" {status}" if status else "", actor)
        return 0x0000, None

    def _guarded(self, operation: str, event: evt.Event, uid: object,
                 handle: Callable[[evt.Event, str, str, str | None], tuple[int | Dataset, Dataset | None]],
                 ) -> tuple[int | Dataset, Dataset | None]:
        """``handle(event, calling_ae, actor, sop_uid)`` behind the last-resort guard: answer and audit, never raise."""
        calling_ae, actor = requestor(event)
        sop_uid = str(uid) if uid else None
        try:
            return handle(event, calling_ae, actor, sop_uid)
        except Exception as exc:
            log.exception("unexpected error handling an MPPS %s from %s", operation, actor)
            return self._refuse(operation, actor, sop_uid, STATUS_PROCESSING_FAILURE,
                                f"internal error: {exc.__class__.__name__}: {exc}")

    def _refuse(self, operation: str, actor: str, sop_uid: str | None, status: int,
                reason: str) -> tuple[Dataset, None]:
        log.warning("MPPS %s from %s refused (0x%04X): %s", operation, actor, status, reason)
        self.book.refused(operation=operation, actor=actor, sop_instance_uid=sop_uid, status=status, reason=reason)
        return status_dataset(status, reason), None


def referenced_instances(attributes: Dataset) -> tuple[str, ...] | None:
    """SOP Instance UIDs listed in the Performed Series Sequence; None when it is absent."""
    if "PerformedSeriesSequence" not in attributes:
        return None
    found: list[str] = []
    for series in attributes.PerformedSeriesSequence or []:
        for keyword in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(keyword) or []:
                if item.get("ReferencedSOPInstanceUID"):
                    found.append(str(item.ReferencedSOPInstanceUID))
    return tuple(dict.fromkeys(found))

