"""Output worker processes: light imports, and the CPU time of each image comes back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gastrolens.daemon.workers import output_workers, write_outputs_in_worker
from gastrolens.dicom_io.documents.outputs import OutputKind, WrittenOutputs, write_outputs

from .synthetic import VL_ENDOSCOPIC, scenario

HEAVY = ("sqlalchemy", "alembic", "torch", "torchvision")


def test_a_worker_imports_neither_the_database_nor_torch():
    """What a spawned worker imports: the worker module, the outputs module, and what
    unpickling its arguments pulls in (settings, findings, a dataset)."""
    code = (
        "import pickle, sys\n"
        "import gastrolens.daemon.workers, gastrolens.dicom_io.documents.outputs\n"
        "from gastrolens.config.schema import OutputSettings\n"
        "pickle.loads(pickle.dumps(OutputSettings()))\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_in_process_result_carries_cpu_seconds(tmp_path: Path):
    source, findings = scenario(VL_ENDOSCOPIC)
    written = write_outputs(source, findings, tmp_path, fsync=False)
    assert isinstance(written, WrittenOutputs)
    assert 0.0 < written.cpu_seconds < 60.0
    assert written.quirks == ()


def test_a_spawned_worker_reports_its_cpu_time_per_image(tmp_path: Path):
    source, findings = scenario(VL_ENDOSCOPIC, rows=96, cols=128)
    with output_workers(1) as pool:
        first = pool.submit(write_outputs_in_worker, source, findings, tmp_path / "a", fsync=False).result(timeout=300)
        second = pool.submit(write_outputs_in_worker, source, findings, tmp_path / "b", fsync=False).result(timeout=300)
    for written in (first, second):
        assert isinstance(written, WrittenOutputs)
        assert {w.kind for w in written} == {OutputKind.SEG, OutputKind.SR, OutputKind.OVERLAY}
        assert all(w.path.exists() for w in written)
        assert 0.0 < written.cpu_seconds < 60.0
    # the first image pays for compiling the templates; the second only fills them
    assert second.cpu_seconds < first.cpu_seconds
