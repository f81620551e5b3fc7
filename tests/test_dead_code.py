"""Nothing is declared that nothing uses: every audit event type is emitted and every error is raised
somewhere in the package (issue 10 item 9). A new type or error comes with the code that uses it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import gastrolens
from gastrolens import errors
from gastrolens.db.states import AuditEventType

SOURCE = Path(gastrolens.__file__).parent
DECLARED_IN = {SOURCE / "db" / "states.py", SOURCE / "errors.py"}


def _package_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(SOURCE.rglob("*.py")) if p not in DECLARED_IN)


@pytest.mark.parametrize("event_type", list(AuditEventType), ids=lambda t: t.name)
def test_every_audit_event_type_is_emitted(event_type: AuditEventType) -> None:
    assert f"AuditEventType.{event_type.name}" in _package_text(), f"{event_type.name} is never recorded"


ERRORS = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
          if issubclass(cls, errors.GastroLensError) and cls.__module__ == errors.__name__]


@pytest.mark.parametrize("error", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_is_raised(error: type[errors.GastroLensError]) -> None:
    assert re.search(rf"\braise {error.__name__}\b", _package_text()), f"{error.__name__} is never raised"
