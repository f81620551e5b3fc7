"""Settings: defaults are the embedded profile; every bad key names the file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

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
        (
            "[dicom.tls]\nenabled = true\ncert = '/nonexistent/cert.pem'\nkey = '/nonexistent/key.pem'\n",
            "dicom.tls",
            "cannot read /nonexistent/cert.pem",
        ),
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
    assert "GASTROLENS_SCHEDULER__INTERVAL_SECONDS" in str(caught.value) and "scheduler.interval_seconds" in str(
        caught.value
    )


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, f"[storage]\nroot = '{tmp_path / 'st'}'\n[dicom]\nae_title = 'ENDO_AI'\n")
    assert load_settings(environ={"GASTROLENS_CONFIG": str(path)}).dicom.ae_title == "ENDO_AI"


def test_settings_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        Settings().dicom.port = 1  # type: ignore[misc]


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        folder,
        "[storage]\nroot = 'data/storage'\n[database]\nurl = 'sqlite:///data/gastrolens.db'\n"
        "[model]\npackage = 'models/r34'\n[[destinations]]\nname = 'export'\nfolder = 'export'\n",
    )
    settings = load_settings(path, environ={})
    assert settings.storage.root == folder / "data" / "storage"
    assert settings.database.url == f"sqlite:///{folder / 'data' / 'gastrolens.db'}"
    assert settings.model.package == folder / "models" / "r34"
    assert settings.destinations[0].folder == folder / "export"
    assert (folder / "data" / "storage").is_dir() and not (elsewhere / "data").exists()


def test_a_relative_config_path_resolves_against_its_folder_too(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", "[storage]\nroot = 'storage'\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings("etc/gastrolens.toml", environ={}).storage.root == tmp_path / "etc" / "storage"


def test_absolute_and_non_file_database_urls_are_kept(tmp_path):
    for url in (
        f"sqlite:///{tmp_path / 'abs.db'}",
        "sqlite:///:memory:",
        "postgresql+psycopg://gl@db.example/gastrolens",
    ):
        path = write(tmp_path, f"[storage]\nroot = '{tmp_path / 'st'}'\n[database]\nurl = '{url}'\n")
        assert load_settings(path, environ={}).database.url == url


def test_environment_and_defaults_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(folder, "[dicom]\nport = 104\n")
    env = {"GASTROLENS_STORAGE__ROOT": "from-env", "GASTROLENS_DATABASE__URL": "sqlite:///from-env.db"}
    settings = load_settings(path, environ=env)
    assert settings.storage.root == Path("from-env") and (tmp_path / "from-env").is_dir()
    assert settings.database.url == "sqlite:///from-env.db"
    assert load_settings(path, environ={}).storage.root == Path("var/storage"), "a default: the working directory"
    assert load_settings(environ={}).database.url == "sqlite:///var/gastrolens.db"


def test_a_misspelt_section_in_a_variable_is_an_unknown_key_naming_the_variable(tmp_path):
    path = write(tmp_path, f"[storage]\nroot = '{tmp_path / 'st'}'\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"GASTROLENS_DICMO__PORT": "104"})
    assert str(caught.value) == "GASTROLENS_DICMO__PORT: dicmo: unknown key"
