"""Audit exports as files: JSON (exact, with the chain check) or CSV (for spreadsheets), and back.

JSON is an object ``{"format", "exported_at", "exported_by", "filter", "chain", "events"}``;
``chain`` is the database's whole-chain check at export time, ``events`` the rows in
chain order. CSV has one header row and the same columns as an event; an empty cell
is a missing UID. Both keep ``detail`` exactly as hashed, so :func:`read_rows` plus
:func:`gastrolens.db.queries_audit.verify_rows` re-check an export without the database.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from gastrolens.db.views import AuditRow

FORMAT = "gastrolens-audit-export/1"
COLUMNS = (
    "id",
    "at",
    "event_type",
    "actor",
    "outcome",
    "study_uid",
    "series_uid",
    "sop_uid",
    "detail",
    "prev_hash",
    "hash",
)


def write_json(out: IO[str], rows: Iterable[AuditRow], header: Mapping[str, Any]) -> int:
    """Stream ``rows`` as a JSON export after ``header``'s fields; return the number of rows."""
    out.write("{\n")
    out.write(f'  "format": {json.dumps(FORMAT)},\n')
    for key, value in header.items():
        out.write(f"  {json.dumps(key)}: {json.dumps(value, default=str, ensure_ascii=False)},\n")
    out.write('  "events": [')
    count = 0
    for row in rows:
        out.write(",\n    " if count else "\n    ")
        out.write(json.dumps(_plain(row), ensure_ascii=False))
        count += 1
    out.write("\n  ]\n}\n" if count else "]\n}\n")
    return count


def write_csv(out: IO[str], rows: Iterable[AuditRow]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        plain = _plain(row)
        writer.writerow(["" if plain[c] is None else plain[c] for c in COLUMNS])
        count += 1
    return count


def _plain(row: AuditRow) -> dict[str, Any]:
    plain = row.model_dump(mode="json")
    plain["at"] = row.at.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return plain


def read_rows(path: Path) -> list[AuditRow]:
    """The events of a JSON or CSV export; ValueError naming the problem if it is neither."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc
    try:
        if text.lstrip().startswith("{"):
            document = json.loads(text)
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                raise ValueError(f"{path}: not a GastroLens audit export (format {FORMAT!r} expected)")
            return [AuditRow.model_validate(e) for e in document.get("events", [])]
        reader = csv.DictReader(text.splitlines())
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: not a GastroLens audit CSV (columns {', '.join(COLUMNS)} expected)")
        return [
            AuditRow.model_validate({k: (v if v != "" or k == "detail" else None) for k, v in r.items()})
            for r in reader
        ]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise ValueError(f"{path}: an event is malformed: {exc.errors(include_url=False)[0]['msg']}") from exc


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
