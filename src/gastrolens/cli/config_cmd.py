"""``gastrolens config show``: the effective settings after file and environment."""

from __future__ import annotations

import argparse
import json

from gastrolens.cli.common import add_config_option, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="settings")
    commands = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = commands.add_parser("show", help="print the effective settings as JSON")
    add_config_option(show)
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    print(json.dumps(settings_from(args).model_dump(mode="json"), indent=2))
    return 0
