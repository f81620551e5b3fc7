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
        first, second, third = (
            pool.submit(write_outputs_in_worker, source, findings, tmp_path / name, fsync=False).result(timeout=300)
            for name in ("a", "b", "c")
        )
    for written in (first, second, third):
        assert isinstance(written, WrittenOutputs)
        assert {w.kind for w in written} == {OutputKind.SEG, OutputKind.SR, OutputKind.OVERLAY}
        assert all(w.path.exists() for w in written)
        assert 0.0 < written.cpu_seconds < 60.0
    # the first is built by the reference path (and pays for imports), the second
    # compiles the templates, the third only fills them
    assert third.cpu_seconds < min(first.cpu_seconds, second.cpu_seconds)
