"""The dicomweb and hl7 destination kinds: what the configuration accepts and refuses, and the
README's example of each destination kind loads as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gastrolens.config import Settings, load_settings
from gastrolens.config.schema import HL7, HL7_CHARSETS, DicomWeb
from gastrolens.daemon.destinations import DicomWebSender, HL7Sender, object_destination_names, sender_for
from gastrolens.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"
HL7_BLOCK = {"kind": "hl7", "name": "ris", "host": "ris", "port": 2575, "receiving_application": "RIS",
             "receiving_facility": "HOSP"}


def test_the_readme_shows_one_loadable_example_of_each_kind():
    section = README.read_text(encoding="utf-8").split("### Destinations", 1)[1]
    block = re.search(r"```toml\n(.*?)```", section, re.S)
    assert block, "README: no toml example under ### Destinations"
    settings = Settings.model_validate(tomllib.loads(block.group(1)))
    assert [d.kind for d in settings.destinations] == ["dicom", "folder", "dicomweb", "hl7"]
    assert settings.destination_kinds() == {"pacs": "dicom", "export": "folder", "archive": "dicomweb",
                                            "ris": "hl7"}


def test_hl7_destinations_take_study_srs_only():
    settings = Settings.model_validate({"destinations": [
        {"kind": "dicomweb", "name": "archive", "url": "http://a/dicom-web"}, HL7_BLOCK,
        {"name": "export", "folder": "/tmp/x"}]})
    assert object_destination_names(settings) == ("archive", "export")
    assert isinstance(sender_for(settings.destinations[0], settings), DicomWebSender)
    assert isinstance(sender_for(settings.destinations[1], settings), HL7Sender)


def test_defaults_and_charsets():
    hl7 = HL7.model_validate(HL7_BLOCK)
    assert (hl7.sending_application, hl7.charset, hl7.ack_timeout_seconds, hl7.processing_id) == (
        "GASTROLENS", "UNICODE UTF-8", 30.0, "P")
    for charset, codec in HL7_CHARSETS.items():
        assert HL7.model_validate({**HL7_BLOCK, "charset": charset}).charset == charset
        assert "x".encode(codec) == b"x"
    web = DicomWeb.model_validate({"kind": "dicomweb", "name": "a", "url": "http://a:8042/dicom-web/"})
    assert web.url == "http://a:8042/dicom-web" and web.token is None and web.timeout_seconds == 30.0


def test_the_token_is_not_shown():
    web = DicomWeb.model_validate({"kind": "dicomweb", "name": "a", "url": "http://a", "token": "s3cret"})
    assert "s3cret" not in repr(web) and "s3cret" not in web.model_dump_json()
    assert web.token is not None and web.token.get_secret_value() == "s3cret"


@pytest.mark.parametrize(("block", "key", "reason"), [
    ('kind = "hl7"\nname = "ris"\nhost = "h"\nport = 2575\nreceiving_facility = "H"\n',
     "destinations.0.hl7.receiving_application", "Field required"),
    ('kind = "hl7"\nname = "ris"\nhost = "h"\nport = 2575\nreceiving_application = "R^S"\nreceiving_facility = "H"\n',
     "destinations.0.hl7.receiving_application", "pattern"),
    ('kind = "hl7"\nname = "ris"\nhost = "h"\nport = 2575\nreceiving_application = "R"\nreceiving_facility = "H"\n'
     'charset = "UTF-8"\n', "destinations.0.hl7.charset", "UNICODE UTF-8"),
    ('kind = "hl7"\nname = "ris"\nhost = "h"\nport = 0\nreceiving_application = "R"\nreceiving_facility = "H"\n',
     "destinations.0.hl7.port", "greater than or equal to 1"),
    ('kind = "dicomweb"\nname = "w"\nurl = "pacs:8042"\n', "destinations.0.dicomweb.url", "http(s) URL"),
    ('kind = "dicomweb"\nname = "w"\n', "destinations.0.dicomweb.url", "Field required"),
    ('kind = "dicomweb"\nname = "w"\nurl = "http://a"\ntimeout_seconds = 0\n',
     "destinations.0.dicomweb.timeout_seconds", "greater than 0"),
])
def test_a_bad_destination_names_file_key_and_reason(tmp_path, block, key, reason):
    path = tmp_path / "gastrolens.toml"
    path.write_text(f"[storage]\nroot = '{tmp_path / 'st'}'\n[[destinations]]\n{block}", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    message = str(caught.value)
    assert str(path) in message and key in message and reason in message, message
