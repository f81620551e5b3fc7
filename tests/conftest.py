"""Fixtures for the whole suite: databases (SQLite and PostgreSQL) and sample DICOM files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import postgres_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs on the embedded SQLite and on the production PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gastrolens.db'}"
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gastrolens.db'}"


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A VL Endoscopic JPEG-baseline file and an uncompressed Secondary Capture, one study."""
    from pydicom.uid import generate_uid

    from gastrolens.findings import LesionClass
    from gastrolens.samples import SECONDARY_CAPTURE, VL_ENDOSCOPIC, as_dicom, endoscopy_frame

    folder = tmp_path_factory.mktemp("samples")
    study = generate_uid()
    frame, _ = endoscopy_frame(240, 320, LesionClass.PU, seed=1)
    files = {}
    for name, sop_class, quality in (("vl_jpeg", VL_ENDOSCOPIC, 90), ("sc_rgb", SECONDARY_CAPTURE, None)):
        ds = as_dicom(frame, sop_class=sop_class, study_uid=study, jpeg_quality=quality)
        files[name] = folder / f"{name}.dcm"
        ds.save_as(files[name], enforce_file_format=True)
    return files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained package with 64 px inputs: the daemon's real code paths, fast on CPU."""
    from gastrolens.models import save_package, untrained_package

    folder = tmp_path_factory.mktemp("tiny-model")
    save_package(untrained_package(classifier_input_size=64, segmenter_input_size=65), folder)
    return folder
