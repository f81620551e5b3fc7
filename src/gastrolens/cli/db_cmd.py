"""``gastrolens db upgrade``: apply pending migrations (``serve`` also does this at start)."""

from __future__ import annotations

import argparse

from gastrolens.cli.common import add_config_option, cli_actor, settings_from
from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("db", help="database maintenance")
    commands = parser.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = commands.add_parser("upgrade", help="apply pending Alembic migrations")
    add_config_option(upgrade)
    upgrade.set_defaults(func=run_upgrade)


def run_upgrade(args: argparse.Namespace) -> int:
    db = Database(settings_from(args).database.url)
    db.upgrade()
    with db.session() as session:
        audit.record(session, audit.Event(type=AuditEventType.DATABASE_UPGRADED, actor=cli_actor()))
    print("database at the latest schema")
    return 0
