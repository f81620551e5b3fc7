"""``gastrolens audit``: verify the hash chain (and export it)."""

from __future__ import annotations

import argparse

from gastrolens.cli import audit_export
from gastrolens.cli.common import add_config_option, cli_actor, open_database, settings_from
from gastrolens.db import audit
from gastrolens.db.states import AuditEventType, Outcome


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("audit", help="the audit trail")
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = commands.add_parser("verify", help="check the hash chain; exit 1 naming the first broken row")
    add_config_option(verify)
    verify.set_defaults(func=run_verify)
    audit_export.register(commands)


def run_verify(args: argparse.Namespace) -> int:
    db = open_database(settings_from(args))
    with db.read_session() as session:
        report = audit.verify_chain(session)
    if not report.intact:
        print(f"audit chain BROKEN at row id {report.first_broken_id}: {report.reason} ({report.rows} rows checked)")
    else:
        print(f"audit chain intact: {report.rows} rows")
    with db.session() as session:
        audit.record(session, audit.Event(type=AuditEventType.AUDIT_VERIFIED, actor=cli_actor(),
                                          outcome=Outcome.SUCCESS if report.intact else Outcome.FAILURE,
                                          detail={"rows": report.rows, "first_broken_id": report.first_broken_id}))
    return 0 if report.intact else 1
