"""Helpers shared by command modules: the --config option and the current operator."""

from __future__ import annotations

import argparse
import getpass
import os
import socket

from gastrolens.config import Settings, load_settings


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="TOML settings file (default: $GASTROLENS_CONFIG, else built-in defaults)")


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def cli_actor() -> str:
    """Who runs this command, for the audit trail: ``cli:user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"
