"""The STOW-RS response (PS3.18 Store Instances Response Module) as DICOM JSON or Native DICOM XML.

One data set: Referenced SOP Sequence (0008,1199) for what is stored, Failed SOP
Sequence (0008,1198) with a Failure Reason (0008,1197) for what is not (the same
status a C-STORE peer would get: 0xA700, 0xA900, 0xC000, 0x0122), and Retrieve URLs
(0008,1190): each stored instance's WADO-RS URL, and the study's when the request
addressed one. The HTTP status follows PS3.18: 200
when everything was stored, 202 when some failed, 409 when all failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree import ElementTree

from pydicom.dataset import Dataset

from gastrolens.dicom_io.net.received import IngestOutcome, IngestResult

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
STORED_RESULTS = (IngestResult.STORED, IngestResult.DUPLICATE)


@dataclass(frozen=True)
class StowResponse:
    status: int
    dataset: Dataset


def build_response(outcomes: Sequence[IngestOutcome], *, base_url: str | None = None,
                   study: str | None = None) -> StowResponse:
    """The response data set and HTTP status for the outcomes of a request's parts, in order.

    ``base_url``: the WADO-RS root (``.../dicomweb``) the Retrieve URLs start with; None: no URLs.
    """
    response = Dataset()
    if base_url is not None and study is not None:
        response.RetrieveURL = f"{base_url}/studies/{study}"
    stored, failed = [], []
    for outcome in outcomes:
        item = Dataset()
        if outcome.sop_class_uid:
            item.ReferencedSOPClassUID = outcome.sop_class_uid
        if outcome.sop_instance_uid:
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.result in STORED_RESULTS:
            if base_url is not None and outcome.study_uid and outcome.series_uid and outcome.sop_instance_uid:
                item.RetrieveURL = (f"{base_url}/studies/{outcome.study_uid}/series/{outcome.series_uid}"
                                    f"/instances/{outcome.sop_instance_uid}")
            stored.append(item)
        else:
            item.FailureReason = outcome.status
            failed.append(item)
    response.FailedSOPSequence = failed
    response.ReferencedSOPSequence = stored
    status = 200 if not failed else 202 if stored else 409
    return StowResponse(status, response)


def dicomweb_root(public_url: str, request_base_url: str) -> str:
    """The DICOMweb root Retrieve URLs start with: ``[api] public_url`` if set, else the request's own."""
    return (public_url or request_base_url).rstrip("/") + "/dicomweb"


def wants_xml(accept: str | None) -> bool:
    """XML only when the client asks for it and not for DICOM JSON (JSON is the default)."""
    accept = (accept or "").lower()
    return DICOM_XML in accept and DICOM_JSON not in accept


def to_xml(dataset: Dataset) -> bytes:
    """Native DICOM Model (PS3.19 A.1) of a data set of UI, US, UR and SQ elements."""
    root = ElementTree.Element("NativeDicomModel", xmlns=NATIVE_DICOM_NAMESPACE)
    _attributes(root, dataset)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


def _attributes(parent: ElementTree.Element, dataset: Dataset) -> None:
    for element in dataset:
        node = ElementTree.SubElement(
            parent, "DicomAttribute", {"tag": f"{element.tag:08X}", "vr": element.VR, "keyword": element.keyword}
        )
        if element.VR == "SQ":
            for number, item in enumerate(element.value, start=1):
                _attributes(ElementTree.SubElement(node, "Item", number=str(number)), item)
            continue
        values = element.value if element.VM > 1 else [element.value] if element.VM == 1 else []
        for number, value in enumerate(values, start=1):
            ElementTree.SubElement(node, "Value", number=str(number)).text = str(value)
