"""A package written by `gastrolens train` is served by `gastrolens serve` unchanged, and its
outputs name it and carry no untrained warning."""

from __future__ import annotations

import json
import time

import pytest
from pydicom import dcmread
from sqlalchemy import select

from gastrolens import UNTRAINED_WARNING
from gastrolens.db import Database
from gastrolens.db.tables import Output, Result
from gastrolens.models import read_card
from gastrolens.training.synthetic import train_tiny_package
from support import basic_config, start_daemon, storescu, write_config


@pytest.fixture(scope="module")
def trained_package(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_package(tmp_path_factory.mktemp("trained"), epochs=1)
    finally:
        torch.set_num_threads(threads)


def test_daemon_serves_a_trained_package(tmp_path, sqlite_url, sample_files, trained_package):
    card = read_card(trained_package)
    assert not card.untrained_networks
    extra = f'[model]\npackage = "{trained_package}"\n[scheduler]\ninterval_seconds = 0.5\n'
    daemon = start_daemon(write_config(tmp_path / "gastrolens.toml", basic_config(tmp_path, sqlite_url, extra)))
    try:
        assert "UNTRAINED" not in daemon.log
        assert storescu(daemon.port, sample_files["sc_rgb"]).returncode == 0
        deadline = time.monotonic() + 120
        while json.loads(daemon.gastrolens("status", "--json").stdout)["instances"]["done"] < 1:
            assert time.monotonic() < deadline, daemon.log
            time.sleep(1)
    finally:
        assert daemon.stop() == 0
    db = Database(sqlite_url)
    with db.session() as session:
        result = session.scalars(select(Result)).one()
        outputs = session.scalars(select(Output)).all()
    served = (result.model_name, result.model_version, result.model_sha256)
    assert served == (card.name, card.version, card.weights_sha256)
    assert result.untrained is False
    assert outputs
    for output in outputs:
        text = all_text(dcmread(tmp_path / "storage" / output.file_path))
        assert card.name in text and card.weights_sha256 in text, output.kind
        assert UNTRAINED_WARNING not in text, output.kind


def all_text(ds) -> str:
    """Every text value in the data set, nested content items included."""
    values: list[str] = []
    ds.walk(lambda _, element: values.append(str(element.value)) if element.VR in TEXT_VRS else None)
    return " ".join(values)


TEXT_VRS = {"LO", "LT", "ST", "UT", "SH", "UC", "UI", "CS", "PN"}
