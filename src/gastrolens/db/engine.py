"""Connecting to the database: engines, sessions and migrations.

There are two kinds of session. :meth:`Database.session` is for work that writes:
on SQLite (the embedded default, in WAL mode) it starts with ``BEGIN IMMEDIATE``, so
writers queue on the database lock instead of failing half way. :meth:`Database.read_session`
is for work that only reads (status, results, audit verification, the API's queries):
a deferred transaction that takes no write lock, so WAL lets it run beside the writer
however long it lasts (a read that held the write lock would make every C-STORE wait
and, past the busy timeout, fail). Read sessions are read-only on both databases
(``PRAGMA query_only`` on SQLite, a READ ONLY transaction on PostgreSQL), so a write
slipped into a read path fails at once instead of reintroducing the lock.
PostgreSQL uses its own row locks (``FOR UPDATE SKIP LOCKED`` in the queue).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gastrolens.errors import DatabaseError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite folders are created and WAL is switched on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _sqlite_transactions(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


_READ_ONLY = "gastrolens_read_only"
"""Execution option of the connections of read sessions (see :meth:`Database.read_session`)."""


def _sqlite_transactions(engine: Engine) -> None:
    # The pysqlite recipe from SQLAlchemy's docs: let SQLAlchemy, not the driver, emit BEGIN.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        if conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("PRAGMA query_only=ON")
            conn.exec_driver_sql("BEGIN DEFERRED")
        else:
            conn.exec_driver_sql("PRAGMA query_only=OFF")
            conn.exec_driver_sql("BEGIN IMMEDIATE")


class SchemaNotCurrent(DatabaseError):
    """The database's schema is not the one this version of GastroLens reads (missing, older or newer)."""


def on_postgresql(session: Session) -> bool:
    """Whether ``session`` talks to PostgreSQL (else SQLite): the one dialect test of the package."""
    return session.get_bind().dialect.name == "postgresql"


class Database:
    """An engine plus its session factory; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        read_options: dict[str, Any] = {_READ_ONLY: True}
        if self.engine.dialect.name == "postgresql":
            read_options["postgresql_readonly"] = True
        self._read_engine = self.engine.execution_options(**read_options)
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one writing transaction: committed on success, rolled back on error.

        On SQLite it holds the write lock from its first statement to its end: keep it short.
        Database failures surface as :class:`DatabaseError`.
        """
        with self._transaction(self._sessions) as session:
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session in one read-only transaction that never blocks writers, however long it is held.

        Writing in it raises :class:`DatabaseError`;
        a read that must be audited records its event afterwards, in a :meth:`session`.
        """
        with self._transaction(self._read_sessions) as session:
            yield session

    @contextmanager
    def _transaction(self, factory: sessionmaker[Session]) -> Iterator[Session]:
        session = factory()
        try:
            with session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database error: {exc.__class__.__name__}: {exc}") from exc
        finally:
            session.close()

    def upgrade(self) -> None:
        """Apply every pending Alembic migration."""
        upgrade(self.engine)

    def require_current_schema(self) -> None:
        """Raise :class:`SchemaNotCurrent` unless the schema is the latest one; changes nothing.

        Commands that only read (and operator commands that change rows, not the schema)
        call this instead of :meth:`upgrade`: only ``serve`` and ``db upgrade`` migrate, so a
        schema change happens when an operator means it to, never as a side effect of a look.
        """
        script = ScriptDirectory.from_config(alembic_config(self.engine))
        head = script.get_current_head()
        try:
            with self._read_engine.connect() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise DatabaseError(f"database error: {exc.__class__.__name__}: {exc}") from exc
        if current == head:
            return
        if current is None:
            raise SchemaNotCurrent("the database has no GastroLens schema yet: run `gastrolens db upgrade`")
        known = {rev.revision for rev in script.walk_revisions()}
        if current not in known:
            raise SchemaNotCurrent(f"the database schema ({current}) is newer than this version of GastroLens "
                                   f"knows ({head}): use the GastroLens version that upgraded it")
        raise SchemaNotCurrent(f"the database schema is older ({current}) than this version of GastroLens "
                               f"reads ({head}): run `gastrolens db upgrade`")

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    try:
        command.upgrade(alembic_config(engine), revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot migrate the database: {exc}") from exc
