"""Fixtures for the whole suite: databases (SQLite and PostgreSQL) and sample DICOM files.

The collection hook below marks tests by what they use, so no test file has to say it:
``postgres`` (a PostgreSQL parameter or fixture), ``daemon`` (`gastrolens serve` in a
subprocess), ``peer`` (DCMTK, Orthanc, Chromium) and ``trains`` (training epochs).
``make test-fast`` leaves those four out. Tests marked ``deploy`` (real containers, minutes of
image building) are skipped unless the marker expression names them: ``make test-deploy``.
"""

from __future__ import annotations

import inspect
import types
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


# -- markers by what a test uses -----------------------------------------------------------------

_DAEMON_FIXTURES = {"daemon", "daemons", "tls_daemon"}
_DAEMON_CALLS = ("start_daemon(",)
_DAEMON_FOLDERS = ("pipeline_e2e", "robustness")  # whole folders that run against a served daemon
_PEER_FIXTURES = {"storescp", "orthanc_factory", "page", "browser", "context"}
_PEER_CALLS = ("storescu(", "dcmtk(", "start_storescp(", "Orthanc(", "chromium", "playwright")
_POSTGRES_FIXTURES = {"postgres_url"}
_TRAINING_MODULES = ("test_train_evaluate.py", "test_reproducibility.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        fixtures = set(item.fixturenames)
        source = _source_with_local_helpers(item.function)
        parts = item.path.parts
        if fixtures & _DAEMON_FIXTURES or any(c in source for c in _DAEMON_CALLS) or \
                any(folder in parts for folder in _DAEMON_FOLDERS):
            item.add_marker(pytest.mark.daemon)
        if fixtures & _PEER_FIXTURES or any(c in source for c in _PEER_CALLS) or "chromium" in item.path.name:
            item.add_marker(pytest.mark.peer)
        if item.path.name in _TRAINING_MODULES and "training" in parts:
            item.add_marker(pytest.mark.trains)
        if item.get_closest_marker("deploy") and "deploy" not in (config.option.markexpr or ""):
            item.add_marker(pytest.mark.skip(reason="container tests: make test-deploy (pytest -m deploy) runs them"))
        params = item.callspec.params.values() if hasattr(item, "callspec") else ()
        if fixtures & _POSTGRES_FIXTURES or any(isinstance(v, str) and v == "postgresql" for v in params):
            item.add_marker(pytest.mark.postgres)


def _source_with_local_helpers(function: types.FunctionType) -> str:
    """The test's source plus that of the module's own functions it calls (one level): a test that
    sends through a local ``_send()`` helper is a peer test as much as one calling storescu itself."""
    try:
        texts = [inspect.getsource(function)]
    except (OSError, TypeError):
        return ""
    module = inspect.getmodule(function)
    for name in function.__code__.co_names:
        helper = getattr(module, name, None)
        if isinstance(helper, types.FunctionType) and helper.__module__ == function.__module__:
            try:
                texts.append(inspect.getsource(helper))
            except (OSError, TypeError):
                pass
    return "\n".join(texts)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Here, not in tests/robustness/conftest.py: pytest reads options only from root conftests and plugins."""
    parser.addoption("--robustness-cases", type=int, default=220,
                     help="how many mutated DICOM cases tests/robustness sends (default 220)")
    parser.addoption("--robustness-seed", type=int, default=20261201, help="seed of the robustness mutation generator")
