"""Manifest parsing and validation: every error names its CSV line; patient-level splits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gastrolens.errors import DatasetError
from gastrolens.findings import LesionClass
from gastrolens.samples import as_dicom, endoscopy_frame
from gastrolens.training.datasets import read_mask, read_rgb
from gastrolens.training.manifest import read_manifest, split_by_patient, summarise

HEADER = ["image", "class", "lesion_id", "patient_id", "mask", "split"]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A few images and masks: PNG, JPEG and DICOM (uncompressed and JPEG baseline)."""
    frame, mask = endoscopy_frame(48, 56, LesionClass.PU, seed=3)
    Image.fromarray(frame).save(tmp_path / "pu.png")
    Image.fromarray(frame).save(tmp_path / "pu.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "pu_mask.png")
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(tmp_path / "small_mask.png")
    normal, _ = endoscopy_frame(48, 56, None, seed=4)
    Image.fromarray(normal).save(tmp_path / "normal.png")
    as_dicom(frame).save_as(tmp_path / "pu.dcm", enforce_file_format=True)
    as_dicom(frame, jpeg_quality=95).save_as(tmp_path / "pu_jpeg.dcm", enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def write(folder: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path = folder / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


GOOD = [
    ["pu.png", "pu", "L1", "P1", "pu_mask.png", ""],
    ["pu.dcm", "pu", "L1", "P1", "pu_mask.png", ""],
    ["pu_jpeg.dcm", "pu", "L2", "P2", "", "test"],
    ["pu.jpg", "pu", "L3", "P3", "", ""],
    ["normal.png", "normal", "N1", "P4", "", ""],
]


def test_a_good_manifest_loads_png_jpeg_and_dicom(files: Path) -> None:
    manifest = read_manifest(write(files, GOOD))
    assert [row.line for row in manifest.rows] == [2, 3, 4, 5, 6]
    first = manifest.rows[0]
    assert first.label is LesionClass.PU and first.shape == (48, 56) and first.mask == files / "pu_mask.png"
    assert manifest.rows[2].split == "test"
    assert [row.has_mask_truth for row in manifest.rows] == [True, True, False, False, True]
    png = read_rgb(files / "pu.png")
    assert np.array_equal(read_rgb(files / "pu.dcm"), png)  # uncompressed DICOM: the same pixels
    assert np.abs(read_rgb(files / "pu_jpeg.dcm").astype(int) - png).mean() < 8  # JPEG: close
    assert read_mask(None, (48, 56)).shape == (48, 56)
    assert read_mask(files / "pu_mask.png", (48, 56)).any()
    summary = summarise(manifest.rows)
    assert summary["images"] == 5 and summary["lesions"] == 4 and summary["patients"] == 4
    assert summary["images_per_class"]["pu"] == 4 and summary["images_with_outline"] == 2
    assert len(manifest.sha256) == 64


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["missing.png", "pu", "L9", "P9", "", ""], "line 3: missing file: image"),
        (["pu.png", "ulcer", "L9", "P9", "", ""], "line 3: unknown class 'ulcer'"),
        (["pu.png", "pu", "L9", "P9", "small_mask.png", ""], "line 3: mask size mismatch"),
        (["pu.png", "pu", "L9", "P9", "gone.png", ""], "line 3: missing file: mask"),
        (["pu.png", "pu", "L9", "P9", "pu.jpg", ""], "line 3: mask"),
        (["notes.txt", "pu", "L9", "P9", "", ""], "line 3: image"),
        (["pu.png", "pu", "", "P9", "", ""], "line 3: empty lesion_id"),
        (["pu.png", "pu", "L9", "", "", ""], "line 3: empty patient_id"),
        (["pu.png", "pu", "L9", "P9", "", "holdout"], "line 3: unknown split 'holdout'"),
        (["normal.png", "agc", "N1", "P4", "", ""], "line 3: lesion 'N1' is agc here but normal on line 2"),
        (["pu.png", "normal", "N1", "P5", "", ""], "line 3: lesion 'N1' belongs to patient 'P5'"),
        (["normal.png", "normal", "N2", "P4", "", ""], "is listed again (first on line 2)"),
    ],
)
def test_every_row_problem_is_named_with_its_line(files: Path, row: list[str], message: str) -> None:
    path = write(files, [["normal.png", "normal", "N1", "P4", "", ""], row])
    with pytest.raises(DatasetError) as caught:
        read_manifest(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_patient_in_both_splits_is_refused(files: Path) -> None:
    path = write(files, [["pu.png", "pu", "L1", "P1", "", "train"], ["pu.jpg", "pu", "L2", "P1", "", "test"]])
    with pytest.raises(DatasetError, match=r"line 3: patient 'P1' is in both splits train \(line 2\) and test"):
        read_manifest(path)
    half = write(files, [["pu.png", "pu", "L1", "P1", "", "val"], ["pu.jpg", "pu", "L2", "P1", "", ""]])
    with pytest.raises(DatasetError, match="line 3: patient 'P1' has no split here but val on line 2"):
        read_manifest(half)


def test_all_problems_are_reported_at_once(files: Path) -> None:
    path = write(files, [["a.png", "pu", "L1", "P1", "", ""], ["b.png", "xx", "L2", "P2", "", ""]])
    with pytest.raises(DatasetError, match="3 problems") as caught:
        read_manifest(path)
    assert "line 2:" in str(caught.value) and "line 3:" in str(caught.value)


def test_header_and_empty_manifest(files: Path) -> None:
    with pytest.raises(DatasetError, match="line 1: header lacks column.*patient_id"):
        read_manifest(write(files, [["pu.png", "pu", "L1"]], header=["image", "class", "lesion_id"]))
    with pytest.raises(DatasetError, match="no rows"):
        read_manifest(write(files, []))
    with pytest.raises(DatasetError, match="cannot read"):
        read_manifest(files / "absent.csv")


def test_patient_level_split_is_disjoint_stratified_and_seeded(tmp_path: Path) -> None:
    frame, _ = endoscopy_frame(40, 40, None, seed=0)
    rows = []
    for cls in ("normal", "pu", "agc"):
        for patient in range(10):
            for view in range(3):
                name = f"{cls}{patient}_{view}.png"
                Image.fromarray(frame).save(tmp_path / name)
                split = "test" if patient == 9 else ""
                rows.append([name, cls, f"{cls}-L{patient}", f"{cls}-P{patient}", "", split])
    manifest = read_manifest(write(tmp_path, rows))
    split = split_by_patient(manifest.rows, 0.2, seed=1)
    train_patients = {r.patient_id for r in split.train}
    val_patients = {r.patient_id for r in split.val}
    assert not train_patients & val_patients
    assert not any(r.split == "test" for r in split.train + split.val)
    assert len(val_patients) == 6  # 20% of 9 per class, rounded: 2 per class
    assert {p.split("-")[0] for p in val_patients} == {"normal", "pu", "agc"}
    assert split_by_patient(manifest.rows, 0.2, seed=1) == split
    assert split_by_patient(manifest.rows, 0.2, seed=2).fingerprint() != split.fingerprint()
