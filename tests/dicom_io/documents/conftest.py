"""Fixtures for the dicom_io tests: validators (dciodvfy, dsrdump) and an artefact folder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dicom_io"
DSRDUMP = "/usr/bin/dsrdump"


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that start with 'Error' (its exit code is unreliable)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    return [line for line in report.splitlines() if line.startswith("Error")]


def assert_dciodvfy_clean(path: Path) -> None:
    errors = dciodvfy_errors(path)
    assert not errors, f"dciodvfy reports for {path.name}:\n" + "\n".join(errors)


def dcentvfy_errors(paths: list[Path]) -> list[str]:
    """dcentvfy's 'Error' lines: patient, study and series attributes consistent across files."""
    if shutil.which("dcentvfy") is None:
        pytest.skip("dcentvfy (dicom3tools) is not installed")
    result = subprocess.run(["dcentvfy", *map(str, paths)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip().startswith("Error")]


def dsrdump(path: Path) -> str:
    """The SR tree as DCMTK's dsrdump prints it; fails the test when dsrdump fails."""
    if not Path(DSRDUMP).exists():
        pytest.skip("dsrdump (DCMTK) is not installed")
    # +U8: print in UTF-8 whatever the Specific Character Set (GB18030 included)
    result = subprocess.run(
        [DSRDUMP, "+U8", "+Pt", str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    assert result.returncode == 0, f"dsrdump failed on {path.name}: {result.stderr}"
    errors = [line for line in result.stderr.splitlines() if line.startswith(("E:", "F:"))]
    assert not errors, f"dsrdump errors on {path.name}: {errors}"
    return result.stdout


def write_fast(source, findings, out_dir: Path, settings=None, **options):
    """write_outputs on the template path: a structure's first image is built by the
    reference path (fast.CACHE compiles on the second sighting), so write it once into a
    scratch folder first."""
    from gastrolens.dicom_io.documents.outputs import write_outputs

    write_outputs(source, findings, out_dir.parent / f".warm-{out_dir.name}", settings, **options)
    return write_outputs(source, findings, out_dir, settings, **options)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """test-artifacts/dicom_io/ (gitignored): rendered overlays for a human to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
