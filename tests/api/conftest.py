"""Fixtures for the read-side tests: filled nodes on SQLite and PostgreSQL (see readside.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from support import postgres_schema

from .readside import Node, make_node, serving


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A filled node, once on SQLite and once on PostgreSQL (module scope: filled once per module)."""
    folder = tmp_path_factory.mktemp("node")
    if request.param == "sqlite":
        made = make_node(f"sqlite:///{folder / 'gastrolens.db'}", folder / "storage")
        yield made
        made.db.dispose()
    else:
        with postgres_schema() as url:
            made = make_node(url, folder / "storage")
            yield made
            made.db.dispose()


@pytest.fixture(scope="module")
def sqlite_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A filled node on SQLite only (for tests whose answer cannot depend on the database)."""
    folder = tmp_path_factory.mktemp("node")
    made = make_node(f"sqlite:///{folder / 'gastrolens.db'}", folder / "storage")
    yield made
    made.db.dispose()



@pytest.fixture(scope="module")
def api(node: Node) -> Iterator[httpx.Client]:
    """A client for ``node``'s API served by uvicorn on an ephemeral port."""
    with serving(node) as client:
        yield client


@pytest.fixture(scope="module")
def sqlite_api(sqlite_node: Node) -> Iterator[httpx.Client]:
    with serving(sqlite_node) as client:
        yield client
