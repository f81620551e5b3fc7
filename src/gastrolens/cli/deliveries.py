"""``gastrolens deliveries``: list deliveries, and queue dead ones again."""

from __future__ import annotations

import argparse
import json

from sqlalchemy import select

from gastrolens.cli.common import add_config_option, cli_actor, open_database, settings_from
from gastrolens.daemon.delivery import requeue
from gastrolens.db import Database
from gastrolens.db.states import DeliveryState
from gastrolens.db.tables import Delivery, Output
from gastrolens.sending import describe_status


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("deliveries", help="outputs on their way to destinations")
    add_config_option(parser)
    parser.add_argument("--state", choices=[s.value for s in DeliveryState], help="only deliveries in this state")
    parser.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run_list)
    actions = parser.add_subparsers(dest="deliveries_command", metavar="ACTION")
    retry = actions.add_parser("retry", help="queue a delivery (by ID) or every dead one (--all-dead) again")
    add_config_option(retry)
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", type=int, help="delivery ID")
    target.add_argument("--all-dead", action="store_true", help="every delivery in state dead")
    retry.set_defaults(func=run_retry)


def _database(args: argparse.Namespace) -> Database:
    return open_database(settings_from(args))


def run_list(args: argparse.Namespace) -> int:
    stmt = (select(Delivery, Output).join(Output, Delivery.output_id == Output.id)
            .order_by(Delivery.updated_at.desc(), Delivery.id.desc()).limit(max(1, args.limit)))
    if args.state:
        stmt = stmt.where(Delivery.state == DeliveryState(args.state))
    settings = settings_from(args)
    kinds = settings.destination_kinds()  # the database keeps destination names; the configuration their kind
    with open_database(settings).read_session() as session:
        rows = [
            {"id": d.id, "destination": d.destination, "destination_kind": kinds.get(d.destination, "unknown"),
             "state": d.state.value, "attempts": d.attempts,
             "last_status": describe_status(kinds.get(d.destination), d.last_status),
             "last_error": d.last_error, "kind": o.kind.value, "sop_instance_uid": o.sop_instance_uid,
             "next_attempt_at": d.next_attempt_at.isoformat(), "updated_at": d.updated_at.isoformat()}
            for d, o in session.execute(stmt)
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no deliveries" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(
        f"{'ID':>6}  {'DESTINATION':<12} {'KIND':<8} {'STATE':<9} {'TRIES':>5}  {'STATUS':<8} {'OUTPUT':<9} "
        "SOP INSTANCE UID / LAST ERROR"
    )
    for r in rows:
        print(
            f"{r['id']:>6}  {r['destination']:<12} {r['destination_kind']:<8} {r['state']:<9} {r['attempts']:>5}  "
            f"{r['last_status'] or '-':<8} "
            f"{r['kind']:<9} {r['sop_instance_uid']}" + (f"\n{'':>8}{r['last_error']}" if r["last_error"] else "")
        )
    return 0


def run_retry(args: argparse.Namespace) -> int:
    count = requeue(_database(args), cli_actor(), delivery_id=args.id, all_dead=args.all_dead)
    print(f"queued {count} deliver{'y' if count == 1 else 'ies'} again")
    return 0 if count or args.all_dead else 1
