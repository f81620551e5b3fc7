"""``gastrolens results``: what GastroLens concluded, by study, patient, accession, day, finding or state.

``gastrolens results [filters] [--format table|json|csv]`` lists studies;
``gastrolens results show STUDY_UID`` prints one study's images with their class
probabilities, lesion area, outputs and delivery states. Each query is audited
(actor ``cli:user@host``, the filter and the number of rows).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from gastrolens.cli.common import add_config_option, cli_actor, open_database, settings_from
from gastrolens.db import audit
from gastrolens.db.filters import DEFAULT_LIMIT, MAX_LIMIT, StudyFilter, StudyQuery, StudyState, explain
from gastrolens.db.queries_studies import get_study, list_studies
from gastrolens.db.states import AuditEventType
from gastrolens.db.views import ResultView, StudyDetail, StudySummary
from gastrolens.findings import CLASS_ORDER, LesionClass

CSV_COLUMNS = ("study_instance_uid", "patient_id", "patient_name", "accession_number", "study_date",
               "study_description", "state", "conclusion", "report_revision", "images", "images_done",
               "images_failed", "images_queued", "findings", "deliveries", "untrained", "first_received_at",
               "last_received_at")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("results", help="find studies and what GastroLens concluded for them",
                            description="List studies matching every given filter, most recently received first.")
    add_config_option(parser)
    parser.add_argument("--study-uid", help="Study Instance UID")
    parser.add_argument("--patient-id", help="Patient ID (exact)")
    parser.add_argument("--accession", dest="accession_number", help="Accession Number (exact)")
    parser.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD", help="first study date")
    parser.add_argument("--to", dest="date_to", metavar="YYYY-MM-DD", help="last study date (inclusive)")
    parser.add_argument("--finding", metavar="CLASS",
                        help=f"conclusion or any image's class: {', '.join(c.value for c in LesionClass)}")
    parser.add_argument("--state", metavar="STATE", help=f"one of {', '.join(s.value for s in StudyState)}")
    parser.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"rows, 1..{MAX_LIMIT} (default {DEFAULT_LIMIT})"
    )
    parser.add_argument("--offset", type=int, default=0, help="rows to skip")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.set_defaults(func=run_list)
    actions = parser.add_subparsers(dest="results_command", metavar="ACTION")
    show = actions.add_parser("show", help="one study: per-image probabilities, lesion area, outputs, deliveries")
    show.add_argument("study_uid", metavar="STUDY_UID")
    # SUPPRESS: given before or after "show", --config and --format keep the value given.
    show.add_argument("--config", "-c", default=argparse.SUPPRESS, help="TOML settings file")
    show.add_argument("--format", choices=("table", "json"), default=argparse.SUPPRESS)
    show.set_defaults(func=run_show)


def _invalid(problems: list[dict[str, str]]) -> int:
    for p in problems:
        print(f"gastrolens: error: {p['field']}: {p['message']}", file=sys.stderr)
    return 2


def run_list(args: argparse.Namespace) -> int:
    given = {
        k: getattr(args, k)
        for k in (
            "study_uid",
            "patient_id",
            "accession_number",
            "date_from",
            "date_to",
            "finding",
            "state",
            "limit",
            "offset",
        )
    }
    try:
        query = StudyQuery.model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        return _invalid(explain(exc))
    db = open_database(settings_from(args))
    with db.read_session() as session:
        page = list_studies(session, query)
    with db.session() as session:
        audit.record(
            session,
            audit.Event(
                type=AuditEventType.QUERY,
                actor=cli_actor(),
                detail={"command": "results", "filter": query.described(), "rows": len(page.items)},
            ),
        )
    if args.format == "json":
        print(page.model_dump_json(indent=2))
    elif args.format == "csv":
        _write_csv(page.items)
    else:
        _print_list(page.items)
        shown = f"{query.offset + 1}-{query.offset + len(page.items)}" if page.items else "none"
        more = f"; --offset {page.next_offset} for more" if page.next_offset is not None else ""
        print(f"\n{shown} of {page.total} studies{more}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    if args.format not in ("table", "json"):
        return _invalid([{"field": "--format", "message": "results show prints table or json"}])
    try:
        uid = StudyFilter(study_uid=args.study_uid).study_uid
    except ValidationError as exc:
        return _invalid(explain(exc))
    assert uid is not None
    db = open_database(settings_from(args))
    with db.read_session() as session:
        study = get_study(session, uid)
    with db.session() as session:
        audit.record(
            session,
            audit.Event(
                type=AuditEventType.QUERY,
                actor=cli_actor(),
                study_uid=uid,
                detail={
                    "command": "results show",
                    "filter": {"study_uid": uid},
                    "rows": 0 if study is None else 1 + len(study.instances),
                },
            ),
        )
    if study is None:
        print(f"gastrolens: error: no study with Study Instance UID {uid}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(study.model_dump_json(indent=2))
    else:
        _print_study(study)
    return 0


# -- rendering ---------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> None:
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _findings(summary: StudySummary) -> str:
    order = [c.value for c in CLASS_ORDER]
    ranked = sorted(summary.findings.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
    return " ".join(f"{k}:{v}" for k, v in ranked) or "-"


def _date(value: str | None) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if value and len(value) == 8 else (value or "-")


def _print_list(items: list[StudySummary]) -> None:
    _table(
        ("STUDY DATE", "PATIENT ID", "ACCESSION", "IMAGES", "FINDINGS", "CONCLUSION", "STATE", "STUDY UID"),
        [
            (
                _date(s.study_date),
                s.patient_id or "-",
                s.accession_number or "-",
                s.images,
                _findings(s),
                (s.conclusion or "-") + (" (UNTRAINED)" if s.untrained else ""),
                s.state.value,
                s.study_instance_uid,
            )
            for s in items
        ],
    )


def _write_csv(items: list[StudySummary]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in items:
        plain = s.model_dump(mode="json")
        plain["findings"] = ";".join(f"{k}={v}" for k, v in sorted(s.findings.items()))
        plain["deliveries"] = ";".join(f"{k}={v}" for k, v in sorted(s.deliveries.items()))
        writer.writerow(["" if plain[c] is None else plain[c] for c in CSV_COLUMNS])


def _print_study(study: StudyDetail) -> None:
    conclusion = (
        LesionClass(study.conclusion).display_name + f" ({study.conclusion})"
        if study.conclusion
        else "not reported yet"
    )
    print(f"Study {study.study_instance_uid}  [{study.state.value}]")
    print(
        f"  Patient ID {study.patient_id or '-'}   Accession {study.accession_number or '-'}   "
        f"Study date {_date(study.study_date)}   {study.study_description or ''}".rstrip()
    )
    print(
        f"  Conclusion {conclusion}" + (f", report revision {study.report_revision}" if study.report_revision else "")
    )
    print(
        f"  Images {study.images}: {study.images_done} done, {study.images_failed} failed, {study.images_queued} queued"
    )
    if study.untrained:
        print("  UNTRAINED MODEL - NOT FOR DIAGNOSTIC USE")
    rows: list[tuple[Any, ...]] = []
    numbers: dict[str, int] = {}
    for n, i in enumerate((i for i in study.instances if not i.superseded), start=1):
        numbers[i.sop_instance_uid] = n
        current: list[ResultView | None] = [r for r in i.results if r.current] or [None]
        for r in current:
            if r is None:
                rows.append((n, i.sop_instance_uid, i.state.value, "-", "", "", "", "", "", ""))
                continue
            p = r.probabilities
            rows.append(
                (
                    n if r.frame_number == 1 else f"{n}.{r.frame_number}",
                    i.sop_instance_uid,
                    i.state.value,
                    r.predicted_class,
                    f"{p.normal:.3f}",
                    f"{p.pu:.3f}",
                    f"{p.egc_hgin:.3f}",
                    f"{p.agc:.3f}",
                    f"{p.smt:.3f}",
                    f"{100 * r.lesion_area_fraction:.1f}%" if r.lesion_present else "none",
                )
            )
    print()
    _table(
        ("IMAGE", "SOP INSTANCE UID", "STATE", "CLASS", "NORMAL", "PU", "EGC/HGIN", "AGC", "SMT", "LESION AREA"), rows
    )
    for i in study.instances:
        if i.error and not i.superseded:
            print(f"  image {numbers[i.sop_instance_uid]} {i.state.value}: {i.error}")
        if i.quirks and not i.superseded:
            print(f"  image {numbers[i.sop_instance_uid]} read despite: {'; '.join(i.quirks)}")
    outputs = [(o, "study") for o in study.study_outputs] + [
        (o, str(numbers.get(o.source_sop_uid or "", "-"))) for i in study.instances for o in i.outputs
    ]
    print()
    if not outputs:
        print("No outputs written yet.")
        return
    _table(
        ("OUTPUT", "SOP INSTANCE UID", "IMAGE", "DELIVERIES"),
        [
            (
                o.kind.value,
                o.sop_instance_uid,
                source,
                " ".join(f"{d.destination}:{d.state.value}" for d in o.deliveries) or "-",
            )
            for o, source in outputs
        ],
    )
