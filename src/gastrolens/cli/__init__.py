"""The ``gastrolens`` command.

Each command group lives in its own module with a ``register(subparsers)`` function;
only this module configures logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gastrolens import __version__
from gastrolens.errors import GastroLensError

COMMAND_MODULES = (
    "gastrolens.cli.serve",
    "gastrolens.cli.status",
    "gastrolens.cli.audit",
    "gastrolens.cli.config_cmd",
    "gastrolens.cli.db_cmd",
    "gastrolens.cli.deliveries",
    "gastrolens.cli.demo",
    "gastrolens.cli.models_cmd",
    "gastrolens.cli.results",
    "gastrolens.cli.api_cmd",
    "gastrolens.cli.train",
    "gastrolens.cli.evaluate",
)
"""Modules that add subcommands; each has ``register(subparsers)``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gastrolens", description="GastroLens DICOM AI node")
    parser.add_argument("--version", action="version", version=f"gastrolens {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default: from config)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # job runs and skipped ticks are noise
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one line per copied module is noise
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except GastroLensError as exc:
        print(f"gastrolens: error: {exc}", file=sys.stderr)
        return 2
