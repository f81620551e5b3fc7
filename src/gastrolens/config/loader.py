"""Load settings from TOML and ``GASTROLENS_<SECTION>__<KEY>`` environment variables.

Every problem is reported as :class:`~gastrolens.errors.ConfigError` naming the file
(or environment variable), the dotted key and the reason, all at once.

A relative path written in the file (``storage.root``, an SQLite ``database.url``, the
model package, TLS files, folder destinations) is relative to the file's folder, as
users expect of a file they keep beside its data; a relative path from an environment
variable, or a default, is relative to the working directory of the process.

Why not pydantic-settings: it validates the merged sources as one, so an error could no
longer name the variable that caused it; it silently ignores a variable whose section is
misspelt (``GASTROLENS_DICMO__PORT``), which this loader reports as an unknown key; a
non-JSON value for a list field fails with "error parsing value for field dicom" without the
key; and resolving file paths needs to know which source a value came from.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gastrolens.config.schema import Settings
from gastrolens.errors import ConfigError

ENV_PREFIX = "GASTROLENS_"
CONFIG_ENV = "GASTROLENS_CONFIG"


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Return validated settings from ``path`` (or ``$GASTROLENS_CONFIG``) plus the environment.

    Without a file the built-in defaults (the embedded profile) apply.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_ENV):
        path = environ[CONFIG_ENV]
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(source, "-", f"cannot read the file: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "-", f"not valid TOML: {exc}") from exc
        _resolve_file_paths(data, Path(path).absolute().parent)
    overridden = _apply_environment(data, environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, source, overridden) from exc
    _check_storage_writable(settings, source)
    return settings


_PATH_KEYS = (("storage", "root"), ("model", "package"), ("dicom", "tls", "cert"), ("dicom", "tls", "key"),
              ("dicom", "tls", "ca"))
_DESTINATION_PATH_KEYS = (("folder",), ("tls", "ca"), ("tls", "cert"), ("tls", "key"))


def _resolve_file_paths(data: dict[str, Any], folder: Path) -> None:
    """Make the relative paths written in a file absolute against ``folder``, in place.

    Values that are not strings are left for validation to report.
    """
    for keys in _PATH_KEYS:
        _resolve_at(data, keys, folder)
    destinations = data.get("destinations")
    if isinstance(destinations, list):
        for destination in destinations:
            for nested in _DESTINATION_PATH_KEYS:
                _resolve_at(destination, nested, folder)
    database = data.get("database")
    if isinstance(database, dict) and isinstance(database.get("url"), str):
        database["url"] = _sqlite_url_against(database["url"], folder)


def _resolve_at(node: object, keys: tuple[str, ...], folder: Path) -> None:
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(value := node.get(keys[-1]), str) and value:
        path = Path(value)
        if not path.is_absolute() and not value.startswith("~"):
            node[keys[-1]] = str(folder / path)


def _sqlite_url_against(url: str, folder: Path) -> str:
    """``url`` with a relative SQLite file made absolute against ``folder``; any other URL unchanged."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url  # validation names the problem
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return url
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str(folder / database)).render_as_string(hide_password=False)


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Merge ``GASTROLENS_SECTION__KEY=value`` into ``data``; return dotted key -> variable name.

    Values are parsed as JSON when they parse (numbers, booleans, lists), else kept as strings.
    """
    overridden: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV or "__" not in name:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(name, ".".join(parts), "cannot override inside a non-table value")
        node[parts[-1]] = value
        overridden[".".join(parts)] = name
    return overridden


def _config_error(exc: ValidationError, source: str, overridden: dict[str, str]) -> ConfigError:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "-"
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        reason = reason.removeprefix("Value error, ")
        where = next((var for dotted, var in overridden.items() if _related(key, dotted)), source)
        problems.append((where, key, reason))
    first = problems[0]
    error = ConfigError(first[0], first[1], first[2])
    if len(problems) > 1:
        error.args = ("\n".join(f"{w}: {k}: {r}" for w, k, r in problems),)
    error.problems = problems  # type: ignore[attr-defined]
    return error


def _related(key: str, dotted: str) -> bool:
    """Whether an error at ``key`` concerns the value set at ``dotted`` (the same key, inside it, or a
    table that holds it: a misspelt section in a variable is reported at the section)."""
    return key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")


def _check_storage_writable(settings: Settings, source: str) -> None:
    root = settings.storage.root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(source, "storage.root", f"{root} is not writable: {exc.strerror}") from exc
