"""Deliveries of every destination kind side by side: `gastrolens deliveries`, the JSON API, the
dashboard's queue page and /metrics name each delivery's kind (dicom, folder, dicomweb, hl7)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from gastrolens.cli import main
from gastrolens.config import Settings
from gastrolens.db import Database
from gastrolens.db.states import DeliveryState
from gastrolens.db.tables import Delivery, Output, Study
from gastrolens.findings import OutputKind

from .readside import VIEWER, VIEWER_TOKEN, Node, serving, settings_for

DESTINATIONS = [
    {"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
    {"kind": "folder", "name": "export", "folder": "/tmp/export"},
    {"kind": "dicomweb", "name": "archive", "url": "http://127.0.0.1:8042/dicom-web"},
    {"kind": "hl7", "name": "ris", "host": "127.0.0.1", "port": 2575, "receiving_application": "RIS",
     "receiving_facility": "HOSP"},
]
# (destination, state, last status, last error)
ROWS = [
    ("pacs", DeliveryState.SENT, 0, None),
    ("export", DeliveryState.SENT, None, None),
    ("archive", DeliveryState.RETRYING, 503, "STOW-RS: HTTP 503 Service Unavailable"),
    ("archive", DeliveryState.DEAD, 0xA900, "STOW-RS: the peer refused the object (Failure Reason 0xA900)"),
    ("ris", DeliveryState.DEAD, None, "HL7: the listener answered AE: order not found"),
    ("ris", DeliveryState.SENT, None, None),
    ("gone", DeliveryState.DEAD, None, "destination 'gone' is no longer configured"),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    folder = tmp_path_factory.mktemp("kinds")
    url = f"sqlite:///{folder / 'gastrolens.db'}"
    db = Database(url)
    db.upgrade()
    with db.session() as session:
        study = Study(study_instance_uid=generate_uid(), patient_id="PID-K", report_revision=1)
        session.add(study)
        session.flush()
        for destination, state, status, error in ROWS:
            output = Output(kind=OutputKind.STUDY_SR, study_id=study.id, instance_id=None,
                            sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.33", file_path="outputs/x.dcm",
                            model_sha256="0" * 64)
            session.add(output)
            session.flush()
            session.add(Delivery(output_id=output.id, destination=destination, state=state, attempts=1,
                                 last_status=status, last_error=error))
    settings = settings_for(url, folder / "storage").model_copy(
        update={"destinations": Settings.model_validate({"destinations": DESTINATIONS}).destinations})
    (folder / "storage").mkdir()
    yield Node(db, folder / "storage", settings, None, url)  # type: ignore[arg-type]
    db.dispose()


@pytest.fixture(scope="module")
def api(node: Node) -> Iterator[httpx.Client]:
    with serving(node) as client:
        yield client


@pytest.fixture
def config(node: Node, tmp_path: Path) -> str:
    blocks = "".join(
        "[[destinations]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in block.items()) for block in DESTINATIONS)
    path = tmp_path / "gastrolens.toml"
    path.write_text(f'[database]\nurl = "{node.url}"\n\n[storage]\nroot = "{node.storage}"\nmin_free_mb = 1\n\n'
                    + blocks)
    return str(path)


def test_cli_lists_the_kind_of_each_destination(capsys, config: str) -> None:  # type: ignore[no-untyped-def]
    assert main(["deliveries", "--config", config, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    kinds = {(r["destination"], r["destination_kind"]) for r in rows}
    assert kinds == {("pacs", "dicom"), ("export", "folder"), ("archive", "dicomweb"), ("ris", "hl7"),
                     ("gone", "unknown")}
    statuses = {(r["destination"], r["state"]): r["last_status"] for r in rows}
    assert statuses[("archive", "retrying")] == "HTTP 503"
    assert statuses[("archive", "dead")] == "0xA900"
    assert statuses[("pacs", "sent")] == "0x0000"
    assert statuses[("ris", "dead")] is None

    assert main(["deliveries", "--config", config, "--state", "dead"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["ID", "DESTINATION", "KIND", "STATE"]
    table = [line.split() for line in lines[1:] if line[:6].strip().isdigit()]
    assert sorted((cells[1], cells[2]) for cells in table) == [("archive", "dicomweb"), ("gone", "unknown"),
                                                                ("ris", "hl7")]


def test_api_names_the_kind_and_the_status_as_the_kind_means_it(api: httpx.Client) -> None:
    page = api.get("/api/deliveries", params={"limit": 50}, headers=VIEWER).json()
    by = {(d["destination"], d["state"]): d for d in page["items"]}
    assert by[("archive", "retrying")]["destination_kind"] == "dicomweb"
    assert by[("archive", "retrying")]["last_status_text"] == "HTTP 503"
    assert by[("ris", "dead")]["destination_kind"] == "hl7"
    assert by[("gone", "dead")]["destination_kind"] is None


def test_the_queue_page_shows_kinds_beside_each_other(api: httpx.Client) -> None:
    client = httpx.Client(base_url=str(api.base_url))
    client.post("/login", data={"token": VIEWER_TOKEN, "next": "/queue"})
    page = client.get("/queue", params={"state": ""})
    assert page.status_code == 200, page.text
    html = page.text
    assert "<th>Kind</th>" in html
    for kind in ("dicom", "folder", "dicomweb", "hl7"):
        assert f"<td>{kind}</td>" in html, kind
    assert "(HTTP 503)" in html and "(0xA900)" in html
    by_kind = html.split('id="deliveries-by-kind"')[1].split("</table>")[0]
    assert "<td>hl7</td>" in by_kind and "<td>unknown</td>" in by_kind


def test_metrics_count_deliveries_by_kind_and_state(api: httpx.Client) -> None:
    text = api.get("/metrics", headers=VIEWER).text
    samples = {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
               if family.name == "gastrolens_deliveries_by_kind" for s in family.samples}

    def count(kind: str, state: str) -> float:
        return samples[(("kind", kind), ("state", state))]
    assert count("dicom", "sent") == 1 and count("folder", "sent") == 1
    assert count("dicomweb", "retrying") == 1 and count("dicomweb", "dead") == 1 and count("dicomweb", "sent") == 0
    assert count("hl7", "dead") == 1 and count("hl7", "sent") == 1
    assert count("unknown", "dead") == 1
    assert sum(samples.values()) == len(ROWS)
