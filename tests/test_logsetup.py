"""logsetup: text or JSON lines on stderr; the format is inherited by processes the daemon spawns."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from gastrolens import logsetup


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(logsetup.FORMAT_ENV, raising=False)
    yield
    logsetup.configure("WARNING", fmt="text")
    os.environ.pop(logsetup.FORMAT_ENV, None)


def test_json_lines_carry_time_level_logger_message_and_process(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.configure("INFO", tag="gl-receiver-0", fmt="json")
    logging.getLogger("gastrolens.test").info("stored %d of %s", 3, "study")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("gastrolens.test").exception("failed")
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO" and first["logger"] == "gastrolens.test"
    assert first["message"] == "stored 3 of study" and first["process"] == "gl-receiver-0"
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: bad" in second["exc_info"]


def test_text_is_the_default_and_a_spawned_process_inherits_json(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.configure("INFO")
    logging.getLogger("gastrolens.test").info("plain")
    assert "INFO gastrolens.test: plain" in capsys.readouterr().err
    logsetup.configure("INFO", fmt="json")
    child = subprocess.run([sys.executable, "-c", "import logging; from gastrolens import logsetup; "
                            "logsetup.configure('INFO'); logging.getLogger('child').info('hi')"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(child.stderr)["message"] == "hi"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        logsetup.configure("INFO", fmt="xml")
