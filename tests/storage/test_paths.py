"""Paths are built only from UIDs that pass the DICOM grammar as a whole string."""

from __future__ import annotations

from pathlib import Path

import pytest

from gastrolens.errors import StorageError
from gastrolens.storage.store import Store


@pytest.mark.parametrize("bad", ["1.2.3\n", "1.2.3 ", "../1.2", "1.02.3", "1." + "2" * 70])
def test_a_uid_outside_the_grammar_never_becomes_a_path(tmp_path: Path, bad: str) -> None:
    store = Store(tmp_path, fsync=False)
    with pytest.raises(StorageError, match="not a valid UID"):
        store.instance_path("1.2.3", "1.2.4", bad, 1)
    with pytest.raises(StorageError, match="not a valid UID"):
        store.output_folder(bad)


def test_a_valid_uid_gets_its_place(tmp_path: Path) -> None:
    store = Store(tmp_path, fsync=False)
    assert store.instance_path("1.2.3", "1.2.4", "1.2.5", 2) == "instances/1.2.3/1.2.4/1.2.5.v2.dcm"
    assert store.output_folder("1.2.3") == (tmp_path / "outputs" / "1.2.3").resolve()
