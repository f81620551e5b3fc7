"""`gastrolens train` / `gastrolens evaluate` refuse bad input before any work, naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from gastrolens.cli import main


def test_a_bad_manifest_fails_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,class,lesion_id,patient_id\nmissing.png,pu,L1,P1\n")
    code = main(["train", "classifier", "--manifest", str(manifest), "--out", str(tmp_path / "pkg")])
    assert code == 2
    assert "line 2: missing file: image" in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()
    code = main(["evaluate", "--manifest", str(manifest), "--model", str(tmp_path), "--out", str(tmp_path / "r")])
    assert code == 2


def test_a_bad_recipe_option_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "segmenter", "--manifest", "m.csv", "--out", str(tmp_path), "--batch-size", "1"])
    assert code == 2
    assert "batch_size" in capsys.readouterr().err


def test_synthetic_data_writes_a_valid_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "synthetic-data", "--out", str(tmp_path), "--lesions-per-class", "1", "--rows", "40",
                 "--cols", "48", "--dicom-every", "3"])
    assert code == 0
    from gastrolens.training.manifest import read_manifest

    manifest = read_manifest(capsys.readouterr().out.strip())
    assert len(manifest.rows) == 10
    assert sum(row.image.suffix == ".dcm" for row in manifest.rows) == 3
