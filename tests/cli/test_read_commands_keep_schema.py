"""Read-only commands never change the schema: only `serve` and `db upgrade` migrate.

Against a missing, empty or older schema a read command says what is wrong, names
`gastrolens db upgrade` and exits non-zero, and the database is as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from gastrolens.cli import main
from gastrolens.db.engine import make_engine, upgrade

OLDEST = "0001"
READ_COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["results"],
    ["results", "show", "1.2.3.4"],
    ["deliveries"],
    ["audit", "verify"],
    ["audit", "export", "--since", "2025-01-01", "--until", "2025-01-02", "--format", "csv"],
]


def _config(tmp_path: Path, url: str) -> str:
    path = tmp_path / "gastrolens.toml"
    path.write_text(f'[database]\nurl = "{url}"\n\n[storage]\nroot = "{tmp_path / "storage"}"\nmin_free_mb = 1\n')
    return str(path)


def _revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _run(capsys: pytest.CaptureFixture[str], argv: list[str], config: str) -> tuple[int, str, str]:
    code = main([*argv, "--config", config])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", READ_COMMANDS, ids=" ".join)
def test_a_read_command_on_an_older_schema_says_so_and_leaves_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, db_url: str, argv: list[str]) -> None:
    engine = make_engine(db_url)
    upgrade(engine, OLDEST)
    engine.dispose()
    code, out, err = _run(capsys, argv, _config(tmp_path, db_url))
    assert code != 0
    assert "older" in err and "run `gastrolens db upgrade`" in err, err
    assert _revision(db_url) == OLDEST


def test_a_read_command_on_an_empty_database_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gastrolens.db'}"
    create_engine(url).connect().close()  # the file exists, without tables
    code, _, err = _run(capsys, ["status"], _config(tmp_path, url))
    assert code != 0 and "no GastroLens schema" in err and "gastrolens db upgrade" in err
    assert _revision(url) is None


def test_a_read_command_without_a_database_file_creates_none(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "var" / "gastrolens.db"
    code, _, err = _run(capsys, ["audit", "verify"], _config(tmp_path, f"sqlite:///{path}"))
    assert code != 0 and f"no database at {path}" in err and "gastrolens db upgrade" in err
    assert not path.exists() and not path.parent.exists()


def test_db_upgrade_then_the_read_command_works(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gastrolens.db'}"
    engine = make_engine(url)
    upgrade(engine, OLDEST)
    engine.dispose()
    config = _config(tmp_path, url)
    assert _run(capsys, ["db", "upgrade"], config)[0] == 0
    assert _revision(url) != OLDEST
    code, out, _ = _run(capsys, ["audit", "verify"], config)
    assert code == 0 and "audit chain intact" in out
