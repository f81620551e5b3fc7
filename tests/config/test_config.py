"""Settings: defaults are the embedded profile; every bad key names the file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from gastrolens.config import Settings, load_settings
from gastrolens.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gastrolens.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.database.url.startswith("sqlite:///var/")
    assert (settings.dicom.bind, settings.dicom.port, settings.dicom.ae_title) == ("127.0.0.1", 11112, "GASTROLENS")
    assert settings.model.package is None and settings.model.device == "auto"


@pytest.mark.parametrize(
    "text, key, reason",
    [
        ("[dicom]\nportt = 104\n", "dicom.portt", "unknown key"),
        ("[dicom]\nport = 'eleven'\n", "dicom.port", "integer"),
        ("[dicom]\nport = 70000\n", "dicom.port", "less than or equal"),
        ("[dicom]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "dicom.ae_title", "at most 16"),
        ("[dicom]\nallowed_peers = ['not-an-ip']\n", "dicom.allowed_peers", "not an IP"),
        ("[model]\ndevice = 'tpu'\n", "model.device", "tpu"),
        ("[database]\nurl = 'mysql://x'\n", "database.url", "unsupported database"),
        ("[[destinations]]\nname = 'pacs'\nhost = 'h'\n", "destinations.0", "ae_title, host and port"),
        ("[dicom.tls]\nenabled = true\ncert = '/nonexistent/cert.pem'\nkey = '/nonexistent/key.pem'\n", "dicom.tls", "cannot read /nonexistent/cert.pem"),
        ("[outputs]\nstudy_priority = ['agc']\n", "outputs.study_priority", "exactly once"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection", "unknown key"),
    ],
)
def test_bad_key_names_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, f"[storage]\nroot = '{tmp_path / 'st'}'\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert str(path) in message and key in message and reason in message


def test_not_toml(tmp_path):
    path = write(tmp_path, "[dicom\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, environ={})


def test_unwritable_storage(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write(tmp_path, f"[storage]\nroot = '{blocker / 'storage'}'\n")
    with pytest.raises(ConfigError, match="storage.root.*not writable"):
        load_settings(path, environ={})


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, f"[storage]\nroot = '{tmp_path / 'st'}'\n[dicom]\nport = 104\n")
    env = {"GASTROLENS_DICOM__PORT": "11113", "GASTROLENS_DICOM__ALLOWED_CALLING_AETS": '["ENDO1", "ENDO2"]'}
    settings = load_settings(path, environ=env)
    assert settings.dicom.port == 11113 and settings.dicom.allowed_calling_aets == ("ENDO1", "ENDO2")


def test_bad_environment_value_names_the_variable(tmp_path):
    path = write(tmp_path, f"[storage]\nroot = '{tmp_path / 'st'}'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"GASTROLENS_SCHEDULER__INTERVAL_SECONDS": "-1"})
    assert "GASTROLENS_SCHEDULER__INTERVAL_SECONDS" in str(caught.value) and "scheduler.interval_seconds" in str(caught.value)


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, f"[storage]\nroot = '{tmp_path / 'st'}'\n[dicom]\nae_title = 'ENDO_AI'\n")
    assert load_settings(environ={"GASTROLENS_CONFIG": str(path)}).dicom.ae_title == "ENDO_AI"


def test_settings_are_frozen():
    with pytest.raises(Exception):
        Settings().dicom.port = 1  # type: ignore[misc]
