"""``gastrolens audit export`` and ``gastrolens audit verify-export``.

``export`` writes the events of a period as JSON (exact, with the database's whole-chain
check at export time) or CSV, and records an ``audit.exported`` event. ``verify-export``
re-checks a file without the database: every row's hash is recomputed and rows whose
ids follow each other must link through ``prev_hash``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from gastrolens.cli.common import add_config_option, cli_actor, open_database, settings_from
from gastrolens.db import audit
from gastrolens.db.audit_export import now_text, read_rows, write_csv, write_json
from gastrolens.db.filters import AuditFilter, explain
from gastrolens.db.queries_audit import iter_events, verify_rows
from gastrolens.db.states import AuditEventType, Outcome


def register(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="write the audit events of a period as CSV or JSON")
    add_config_option(export)
    export.add_argument("--since", required=True, metavar="WHEN", help="first instant, ISO 8601 (UTC if no offset)")
    export.add_argument("--until", required=True, metavar="WHEN", help="end instant, exclusive")
    export.add_argument("--type", action="append", default=[], metavar="TYPE",
                        help="only this event type (repeatable), e.g. query, delivery.dead")
    export.add_argument("--actor", help="only this actor")
    export.add_argument("--study-uid", help="only events about this study")
    export.add_argument("--format", choices=("json", "csv"), default="json")
    export.add_argument("--output", "-o", type=Path, help="file to write (default: standard output)")
    export.set_defaults(func=run_export)
    check = commands.add_parser("verify-export", help="re-check the hashes and links of an exported file")
    check.add_argument("file", type=Path, metavar="FILE")
    check.set_defaults(func=run_verify_export)


def run_export(args: argparse.Namespace) -> int:
    given = {
        "since": args.since,
        "until": args.until,
        "type": args.type,
        "actor": args.actor,
        "study_uid": args.study_uid,
    }
    try:
        flt = AuditFilter.model_validate({k: v for k, v in given.items() if v not in (None, [])})
    except ValidationError as exc:
        for p in explain(exc):
            print(f"gastrolens: error: --{p['field'].split('.')[0].replace('_', '-')}: {p['message']}", file=sys.stderr)
        return 2
    actor = cli_actor()
    db = open_database(settings_from(args))
    with db.read_session() as session:
        chain = audit.verify_chain(session)
    chain_state = {
        "intact": chain.intact,
        "rows": chain.rows,
        "first_broken_id": chain.first_broken_id,
        "reason": chain.reason,
    }
    with _opened(args.output) as out, db.read_session() as session:
        events = iter_events(session, flt)
        if args.format == "csv":
            count = write_csv(out, events)
        else:
            count = write_json(
                out,
                events,
                {"exported_at": now_text(), "exported_by": actor, "filter": flt.described(), "chain": chain_state},
            )
    with db.session() as session:
        audit.record(
            session,
            audit.Event(
                type=AuditEventType.AUDIT_EXPORTED,
                actor=actor,
                outcome=Outcome.SUCCESS if chain.intact else Outcome.WARNING,
                detail={
                    "filter": flt.described(),
                    "format": args.format,
                    "rows": count,
                    "chain_intact": chain.intact,
                    "output": args.output.name if args.output else "stdout",
                },
            ),
        )
    print(
        f"exported {count} audit events; "
        f"chain {'intact' if chain.intact else 'BROKEN at row ' + str(chain.first_broken_id)}"
        f" ({chain.rows} rows verified)",
        file=sys.stderr,
    )
    return 0 if chain.intact else 1


@contextlib.contextmanager
def _opened(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8", newline="") as out:
        yield out


def run_verify_export(args: argparse.Namespace) -> int:
    try:
        rows = read_rows(args.file)
    except ValueError as exc:
        print(f"gastrolens: error: {exc}", file=sys.stderr)
        return 2
    check = verify_rows(rows)
    if not check.intact:
        for problem in check.problems:
            print(f"BROKEN {problem}")
        print(
            f"{args.file}: {check.rows} rows, {len(check.problems)} do not verify (first: row {check.first_broken_id})"
        )
        return 1
    gaps = f", {check.gaps} gaps where the export skips rows (filtered)" if check.gaps else ""
    print(f"{args.file}: {check.rows} rows, every hash verifies, {check.linked} links checked{gaps}")
    return 0
