"""The audit trail is append-only and its hash chain catches any edit made behind its back."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy
from sqlalchemy import select, text

from gastrolens.db import Database, audit
from gastrolens.db.states import AuditEventType, Outcome
from gastrolens.db.tables import AuditEvent


@pytest.fixture
def db(db_url):
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


def add_events(db: Database, n: int) -> None:
    for i in range(n):
        with db.session() as s:
            audit.record(s, audit.Event(type=AuditEventType.SERVICE_STARTED, actor="dicom:ENDO@127.0.0.1",
                                        outcome=Outcome.SUCCESS,
                                        detail={"i": i, "patient": "张黎明"}))


def test_chain_links_each_row_to_the_previous(db):
    add_events(db, 5)
    with db.session() as s:
        rows = s.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert rows[0].prev_hash == audit.GENESIS_HASH
        assert all(b.prev_hash == a.hash for a, b in zip(rows, rows[1:], strict=False))
        assert audit.verify_chain(s).intact


def test_database_refuses_update_and_delete(db):
    add_events(db, 2)
    for statement in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(sqlalchemy.exc.SQLAlchemyError, match="append-only"), db.engine.begin() as conn:
            conn.execute(text(statement))


def _drop_guard(db: Database) -> None:
    """What a tamperer with DBA rights would do first."""
    with db.engine.begin() as conn:
        if db.engine.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_append_only ON audit_events"))


def test_edited_row_is_named(db):
    add_events(db, 5)
    _drop_guard(db)
    with db.engine.begin() as conn:
        third = conn.execute(text("SELECT id FROM audit_events ORDER BY id LIMIT 1 OFFSET 2")).scalar_one()
        conn.execute(text("UPDATE audit_events SET detail = :d WHERE id = :id"), {"d": '{"i":99}', "id": third})
    with db.session() as s:
        report = audit.verify_chain(s)
    assert not report.intact and report.first_broken_id == third and "edited" in report.reason


def test_deleted_row_is_caught(db):
    add_events(db, 5)
    _drop_guard(db)
    with db.engine.begin() as conn:
        ids = conn.execute(text("SELECT id FROM audit_events ORDER BY id")).scalars().all()
        conn.execute(text("DELETE FROM audit_events WHERE id = :id"), {"id": ids[1]})
    with db.session() as s:
        report = audit.verify_chain(s)
    assert report.first_broken_id == ids[2] and "removed" in report.reason


def test_concurrent_writers_keep_one_chain(db):
    threads = [threading.Thread(target=add_events, args=(db, 10)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.session() as s:
        report = audit.verify_chain(s)
    assert report.intact and report.rows == 40


def test_event_commits_with_its_transaction(db):
    with pytest.raises(RuntimeError), db.session() as s:
        audit.record(s, audit.Event(type=AuditEventType.SERVICE_STARTED, actor="x"))
        raise RuntimeError("the state change failed")
    with db.session() as s:
        assert s.scalar(select(sqlalchemy.func.count()).select_from(AuditEvent)) == 0
