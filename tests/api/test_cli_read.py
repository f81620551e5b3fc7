"""``gastrolens results``, ``results show``, ``audit export`` / ``verify-export`` and ``api token``."""

from __future__ import annotations

import csv
import io
import json
import tomllib
from pathlib import Path

import pytest

from gastrolens.api.auth import TokenRegistry
from gastrolens.cli import main
from gastrolens.config.schema import APIToken
from gastrolens.db.states import AuditEventType

from .readside import Node, query_events


@pytest.fixture(scope="module")
def config(sqlite_node: Node, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli") / "gastrolens.toml"
    path.write_text(
        f'[database]\nurl = "{sqlite_node.url}"\n\n[storage]\nroot = "{sqlite_node.storage}"\nmin_free_mb = 1\n'
    )
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_results_table_lists_studies_and_is_audited(capsys, config: str, sqlite_node: Node) -> None:  # type: ignore[no-untyped-def]
    before = len(query_events(sqlite_node))
    code, out, _ = run(capsys, "results", "--config", config, "--from", "2025-03-01", "--to", "2025-03-02")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "STUDY",
        "DATE",
        "PATIENT",
        "ID",
        "ACCESSION",
        "IMAGES",
        "FINDINGS",
        "CONCLUSION",
        "STATE",
        "STUDY",
        "UID",
    ]
    assert "PID-0002" in lines[1] and "agc" in lines[1] and "delivery_dead" in lines[1]
    assert "PID-0001" in lines[2] and "egc_hgin:1" in lines[2] and "complete" in lines[2]
    assert lines[-1] == "1-2 of 2 studies"
    (event,) = query_events(sqlite_node)[before:]
    assert event.actor.startswith("cli:")
    assert json.loads(event.detail) == {
        "command": "results",
        "rows": 2,
        "filter": {"date_from": "2025-03-01", "date_to": "2025-03-02", "limit": 50, "offset": 0},
    }


def test_results_json_and_csv(capsys, config: str, sqlite_node: Node) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "results", "--config", config, "--finding", "agc", "--format", "json")
    assert code == 0
    page = json.loads(out)
    assert page["total"] == 1 and page["items"][0]["study_instance_uid"] == sqlite_node.filled.dead
    code, out, _ = run(capsys, "results", "--config", config, "--limit", "3", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == 3
    assert rows[0]["study_instance_uid"] == sqlite_node.filled.queued and rows[0]["state"] == "queued"
    assert rows[2]["findings"] == "egc_hgin=1;normal=2;pu=1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patient-id", "' OR 1=1 --"], "patient_id: may hold only"),
        (["--from", "March"], "date_from: must be an ISO date"),
        (["--finding", "tumour"], "finding: must be one of"),
        (["--limit", "100000"], "limit: Input should be less than or equal to 500"),
        (["--study-uid", "1.2.03"], "study_uid: not a DICOM UID"),
    ],
)
def test_results_rejects_bad_filters(capsys, config: str, argv: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(capsys, "results", "--config", config, *argv)
    assert code == 2 and out == ""
    assert message in err


def test_results_show_prints_probabilities_area_outputs_and_deliveries(capsys, config: str, sqlite_node: Node) -> None:  # type: ignore[no-untyped-def]
    f = sqlite_node.filled
    before = len(query_events(sqlite_node))
    code, out, _ = run(capsys, "results", "show", f.dead, "--config", config)
    assert code == 0
    assert f"Study {f.dead}  [delivery_dead]" in out
    assert "Conclusion advanced gastric cancer (agc)" in out
    image_rows = [line for line in out.splitlines() if line.startswith(("1 ", "2 ", "3 "))]
    assert len(image_rows) == 3
    assert image_rows[0].split()[2:] == ["done", "agc", "0.095", "0.095", "0.095", "0.620", "0.095", "4.3%"]
    assert "overlay" in out and "pacs:dead" in out and "study_sr" in out
    (event,) = query_events(sqlite_node)[before:]
    assert event.study_uid == f.dead and json.loads(event.detail)["command"] == "results show"

    code, out, _ = run(capsys, "results", "--config", config, "show", f.complete, "--format", "json")
    assert code == 0 and json.loads(out)["conclusion"] == "egc_hgin"


def test_results_show_unknown_or_malformed_uid(capsys, config: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "results", "show", "1.2.3.4", "--config", config)
    assert code == 1 and "no study" in err
    code, _, err = run(capsys, "results", "show", "DROP TABLE", "--config", config)
    assert code == 2 and "not a DICOM UID" in err


def test_audit_export_json_verifies_and_is_audited(capsys, config: str, sqlite_node: Node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "audit.json"
    code, _, err = run(
        capsys,
        "audit",
        "export",
        "--config",
        config,
        "--since",
        "2000-01-01",
        "--until",
        "2100-01-01",
        "--format",
        "json",
        "--output",
        str(target),
    )
    assert code == 0 and "chain intact" in err
    document = json.loads(target.read_text())
    assert document["format"] == "gastrolens-audit-export/1"
    assert document["chain"]["intact"] is True
    ids = [e["id"] for e in document["events"]]
    assert ids == list(range(1, len(ids) + 1))
    code, out, _ = run(capsys, "audit", "verify-export", str(target))
    assert code == 0 and f"{len(ids)} rows, every hash verifies, {len(ids) - 1} links checked" in out

    # one character changed in one row: the export no longer verifies, and says where
    document["events"][3]["actor"] = "someone-else"
    target.write_text(json.dumps(document))
    code, out, _ = run(capsys, "audit", "verify-export", str(target))
    assert code == 1 and f"row {ids[3]}: content does not match its hash" in out

    with sqlite_node.db.session() as session:
        from sqlalchemy import select

        from gastrolens.db.tables import AuditEvent

        last = session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).one()
    assert last.event_type == AuditEventType.AUDIT_EXPORTED
    assert json.loads(last.detail)["rows"] == len(ids) and json.loads(last.detail)["format"] == "json"


def test_audit_export_csv_of_one_type_verifies_with_gaps(capsys, config: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "audit.csv"
    code, _, _ = run(
        capsys,
        "audit",
        "export",
        "--config",
        config,
        "--since",
        "2000-01-01T00:00:00Z",
        "--until",
        "2100-01-01",
        "--type",
        "query",
        "--type",
        "audit.exported",
        "--format",
        "csv",
        "-o",
        str(target),
    )
    assert code == 0
    rows = list(csv.DictReader(target.open()))
    assert rows and {r["event_type"] for r in rows} <= {"query", "audit.exported"}
    code, out, _ = run(capsys, "audit", "verify-export", str(target))
    assert code == 0 and "every hash verifies" in out


def test_audit_export_period_and_bad_arguments(capsys, config: str) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "audit", "export", "--config", config, "--since", "2000-01-01", "--until", "2000-01-02")
    assert code == 0 and json.loads(out)["events"] == []
    code, _, err = run(capsys, "audit", "export", "--config", config, "--since", "tomorrow", "--until", "2100-01-01")
    assert code == 2 and "--since" in err
    code, _, err = run(
        capsys,
        "audit",
        "export",
        "--config",
        config,
        "--since",
        "2000-01-01",
        "--until",
        "2100-01-01",
        "--type",
        "made.up",
    )
    assert code == 2 and "must be one of" in err


def test_verify_export_refuses_other_files(capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    code, _, err = run(capsys, "audit", "verify-export", str(other))
    assert code == 2 and "not a GastroLens audit export" in err


def test_api_token_prints_a_token_and_the_table_that_admits_it(capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "api", "token", "night-shift", "--role", "auditor")
    assert code == 0
    token = out.split("\n\n")[1].strip()
    table = tomllib.loads(out[out.index("[[api.tokens]]") :])["api"]["tokens"][0]
    assert table["name"] == "night-shift" and table["role"] == "auditor"
    principal = TokenRegistry([APIToken(**table)]).identify(token)
    assert principal is not None and principal.name == "night-shift"
    assert token not in out[out.index("[[api.tokens]]") :]
    code, _, err = run(capsys, "api", "token", 'bad"name')
    assert code == 2 and "NAME" in err
