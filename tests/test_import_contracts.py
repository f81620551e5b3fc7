"""Dependencies point one way (design.md; issue 10 item 6), checked on the import graph.

Static contracts read every ``import`` in the source with grimp, imports inside functions
included, so a lazy import cannot hide a dependency. The spawned output workers are also
checked at run time: a fresh interpreter imports them and must not have loaded SQLAlchemy
or Alembic (each worker process pays for what it imports, and must not touch the database).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache

import grimp
import pytest

DICOM_LIBRARIES = ("pydicom", "highdicom", "pynetdicom")


@cache
def graph() -> grimp.ImportGraph:
    # External packages appear under their top-level name ("torch", "pydicom").
    return grimp.build_graph("gastrolens", include_external_packages=True)


def offending_imports(importer: str, imported: tuple[str, ...]) -> list[str]:
    """Every ``module -> import`` line where a module of package ``importer`` imports one of ``imported``."""
    found = []
    for module in sorted(graph().find_descendants(importer) | {importer}):
        for target in sorted(graph().find_modules_directly_imported_by(module)):
            if any(target == name or target.startswith(name + ".") for name in imported):
                lines = graph().get_import_details(importer=module, imported=target)
                where = ", ".join(f"line {d['line_number']}" for d in lines)
                found.append(f"{module} -> {target} ({where})")
    return found


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("gastrolens.dicom_io", ("gastrolens.db",)),
    ("gastrolens.db", ("gastrolens.dicom_io",)),
    ("gastrolens.models", ("gastrolens.dicom_io", *DICOM_LIBRARIES)),
    ("gastrolens.dicom_io", ("torch", "torchvision")),
], ids=["dicom_io-not-db", "db-not-dicom_io", "models-not-dicom", "dicom_io-not-torch"])
def test_package_does_not_import(importer: str, forbidden: tuple[str, ...]) -> None:
    assert offending_imports(importer, forbidden) == []


def test_the_contracts_see_imports_at_all() -> None:
    """Guards the guard: the graph knows imports that do exist, lazy ones included."""
    assert offending_imports("gastrolens.dicom_io", ("pydicom",)), "dicom_io imports pydicom"
    assert offending_imports("gastrolens.models", ("torch",)), "models imports torch"
    assert offending_imports("gastrolens.daemon", ("gastrolens.db",)), "the daemon wires the database"


@pytest.mark.parametrize("module", ["gastrolens.daemon.workers", "gastrolens.dicom_io.documents.outputs"])
def test_output_workers_load_neither_sqlalchemy_nor_alembic(module: str) -> None:
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
