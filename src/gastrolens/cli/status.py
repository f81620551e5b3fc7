"""``gastrolens status``: what is queued, done, failed, quarantined and delivered."""

from __future__ import annotations

import argparse
import json

from gastrolens.cli.common import add_config_option, open_database, settings_from
from gastrolens.db.queries import status_counts


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("status", help="counts of instances, quarantine and deliveries")
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    db = open_database(settings_from(args))
    with db.read_session() as session:
        counts = status_counts(session)
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    inst, out = counts["instances"], counts["outputs"]
    print("instances   " + "  ".join(f"{k} {v}" for k, v in inst.items()))
    print(f"quarantined {counts['quarantined']}")
    print("deliveries  " + "  ".join(f"{k} {v}" for k, v in out.items()))
    print(
        f"queue depth {counts['queue_depth']}   "
        f"throughput {counts['images_per_minute_last_5_min']} images/min (last 5 min)"
    )
    return 0
