"""``gastrolens serve``: run the daemon in the foreground."""

from __future__ import annotations

import argparse

from gastrolens.cli.common import add_config_option, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run the DICOM node in the foreground (logs to stderr)")
    add_config_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from(args)  # before the heavy imports (torch): a bad config fails in well under a second
    from gastrolens.daemon.service import Service

    return Service(settings).run()
