"""Helpers shared by command modules: the --config option, the database of a read command, the current operator."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
from pathlib import Path

from sqlalchemy.engine import make_url

from gastrolens.config import Settings, load_settings
from gastrolens.db import Database
from gastrolens.db.engine import SchemaNotCurrent


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", default=None, help="TOML settings file (default: $GASTROLENS_CONFIG, else built-in defaults)"
    )


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def open_database(settings: Settings) -> Database:
    """The configured database, for a command that must not change its schema.

    Raises :class:`SchemaNotCurrent` (the command exits non-zero naming ``gastrolens db upgrade``)
    when the schema is missing or not the latest; an SQLite file that does not exist is not
    created.
    """
    url = make_url(settings.database.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database)
        if not path.exists():
            raise SchemaNotCurrent(f"no database at {path}: run `gastrolens db upgrade` (or `gastrolens serve`) first")
    db = Database(settings.database.url)
    try:
        db.require_current_schema()
    except SchemaNotCurrent:
        db.dispose()
        raise
    return db


def cli_actor() -> str:
    """Who runs this command, for the audit trail: ``cli:user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"
