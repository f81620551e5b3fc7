"""[[dicom.peers]]: the AEs known by address (storage commitment reports, C-MOVE destinations)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gastrolens.config.schema import KnownPeer, Settings


def _settings(*peers: dict[str, object]) -> Settings:
    return Settings.model_validate({"dicom": {"peers": list(peers)}})


def test_a_peer_is_found_by_ae_title_ignoring_padding() -> None:
    settings = _settings({"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "move_destination": False})
    peer = settings.dicom.peer("ORTHANC ")
    assert isinstance(peer, KnownPeer)
    assert (peer.host, peer.port, peer.storage_commitment, peer.move_destination) == ("127.0.0.1", 4242, True, False)
    assert not peer.tls.enabled
    assert settings.dicom.peer("OTHER") is None


def test_no_peers_by_default() -> None:
    assert Settings().dicom.peers == ()


def test_duplicate_ae_titles_are_refused() -> None:
    with pytest.raises(ValidationError, match="unique"):
        _settings({"ae_title": "A", "host": "h", "port": 1}, {"ae_title": "A", "host": "g", "port": 2})


@pytest.mark.parametrize(
    ("peer", "field"),
    [
        ({"ae_title": "BAD\\AE", "host": "h", "port": 1}, "ae_title"),
        ({"ae_title": "A", "host": "", "port": 1}, "host"),
        ({"ae_title": "A", "host": "h", "port": 0}, "port"),
        ({"ae_title": "A", "host": "h", "port": 1, "colour": "red"}, "colour"),
    ],
)
def test_a_bad_peer_names_its_field(peer: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        _settings(peer)
    assert any(error["loc"][-1] == field for error in info.value.errors())
