"""The ``gastrolens`` command.

Each command group lives in its own module with a ``register(subparsers)`` function;
only this module configures logging (through `gastrolens.logsetup`, shared with receiver processes).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gastrolens import __version__, logsetup
from gastrolens.errors import GastroLensError

COMMANDS = {
    "serve": "gastrolens.cli.serve",
    "status": "gastrolens.cli.status",
    "demo": "gastrolens.cli.demo",
    "deliveries": "gastrolens.cli.deliveries",
    "results": "gastrolens.cli.results",
    "audit": "gastrolens.cli.audit",
    "models": "gastrolens.cli.models_cmd",
    "train": "gastrolens.cli.train",
    "evaluate": "gastrolens.cli.evaluate",
    "api": "gastrolens.cli.api_cmd",
    "config": "gastrolens.cli.config_cmd",
    "db": "gastrolens.cli.db_cmd",
    "studies": "gastrolens.cli.studies",
}
"""Command name -> module with ``register(subparsers)``. Only the module of the command
being run is imported (importing torch for ``gastrolens status`` would cost seconds)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` only, or for every command when it is None or unknown."""
    parser = argparse.ArgumentParser(prog="gastrolens", description="GastroLens DICOM AI node")
    parser.add_argument("--version", action="version", version=f"gastrolens {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default: from config)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logsetup.configure((args.log_level or "INFO").upper())
    try:
        return int(args.func(args) or 0)
    except GastroLensError as exc:
        print(f"gastrolens: error: {exc}", file=sys.stderr)
        return 2
