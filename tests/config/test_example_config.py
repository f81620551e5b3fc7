"""deploy/gastrolens.example.toml documents every settings key with its default.

The file loads to exactly ``Settings()``; every field of the schema, walked
recursively (including list items such as ``[[destinations]]`` and
``[[api.tokens]]``), is mentioned in its section, set or as a commented example;
and the commented examples, un-commented, are valid settings too.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from gastrolens.config import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "gastrolens.example.toml"

_HEADER = re.compile(r"^\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=")
_COMMENTED_SETTING = re.compile(r"^#\s?(\[.*\]|[A-Za-z_][A-Za-z0-9_]*\s*=.*)$")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The defaults are relative paths (var/storage, var/gastrolens.db) and loading
    # creates storage.root: keep that out of the working tree.
    monkeypatch.chdir(tmp_path)


def schema_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dotted key of ``model``; items of tuple[Model, ...] fields count as tables."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.add(dotted)
        for nested in _models_in(field.annotation):
            keys |= schema_keys(nested, dotted + ".")
    return keys


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """Every model in ``annotation``: each member of a union (destinations: DICOM peer | folder)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [found for arg in typing.get_args(annotation) for found in _models_in(arg)]


def mentioned_keys(text: str) -> set[str]:
    """Dotted keys the file sets or shows in a commented example, by section."""
    keys: set[str] = set()
    section = ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        if header := _HEADER.match(line):
            section = header.group(1)
            parts = section.split(".")
            keys |= {".".join(parts[: i + 1]) for i in range(len(parts))}
        elif key := _KEY.match(line):
            keys.add(f"{section}.{key.group(1)}" if section else key.group(1))
    return keys


def uncomment_examples(text: str) -> str:
    return "\n".join(
        m.group(1) if (m := _COMMENTED_SETTING.match(line.strip())) else line for line in text.splitlines()
    )


def test_example_loads_to_the_defaults() -> None:
    assert load_settings(EXAMPLE, environ={}) == Settings()


def test_every_schema_key_is_documented() -> None:
    missing = sorted(schema_keys(Settings) - mentioned_keys(EXAMPLE.read_text(encoding="utf-8")))
    assert not missing, f"keys of the Settings schema not in {EXAMPLE.name}: {missing}"


def test_no_key_in_the_example_is_unknown_to_the_schema() -> None:
    unknown = sorted(mentioned_keys(EXAMPLE.read_text(encoding="utf-8")) - schema_keys(Settings))
    assert not unknown, f"{EXAMPLE.name} mentions keys the schema does not have: {unknown}"


def test_commented_examples_are_valid_settings(tmp_path: Path) -> None:
    uncommented = tmp_path / "all-examples.toml"
    uncommented.write_text(uncomment_examples(EXAMPLE.read_text(encoding="utf-8")), encoding="utf-8")
    settings = load_settings(uncommented, environ={})
    assert [(d.name, d.kind) for d in settings.destinations] == [
        ("pacs", "dicom"), ("export", "folder"), ("archive", "dicomweb"), ("ris", "hl7")]
    assert settings.destinations[0].tls.enabled
    assert settings.destinations[1].folder == Path("/srv/gastrolens/export")
    assert settings.destinations[2].url == "http://127.0.0.1:8042/dicom-web"
    assert settings.destinations[3].charset == "UNICODE UTF-8"
    assert [t.role for t in settings.api.tokens] == ["viewer"]
    assert settings.dicom.tls.ca == Path("/etc/gastrolens/tls/clients-ca.crt")
    assert not settings.dicom.tls.enabled  # the file checks run only when enabled


def test_the_walk_finds_nested_and_list_item_keys() -> None:
    keys = schema_keys(Settings)
    assert {"dicom.tls.cert", "destinations.tls.key", "destinations.folder", "api.tokens.sha256"} <= keys
