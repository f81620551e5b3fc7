"""Two `gastrolens serve` processes on one PostgreSQL database and one storage root.

All images go to process A; both processes claim from the shared queue (FOR UPDATE SKIP
LOCKED). Every image is processed exactly once, whoever took it; study completion writes each
study SR revision once and delivery sends each output once. Retention then runs in two workers
at the same moment: each row is retired, and each file removed, exactly once.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from gastrolens.db.states import AuditEventType
from gastrolens.findings import LesionClass
from pipeline_e2e.peers import (
    DatabaseView,
    detail,
    folder_destination,
    make_study,
    output_kinds,
    pipeline_config,
    wait_for,
)
from support import postgres_schema, storescu

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STUDIES, PER_STUDY = 5, 10
LESIONS = [None, LesionClass.PU, LesionClass.AGC, LesionClass.SMT, LesionClass.EGC_HGIN]


@pytest.fixture
def postgres_url():
    with postgres_schema() as url:
        yield url


def test_two_processes_share_the_queue_and_process_each_image_once(tmp_path, postgres_url, tiny_model, daemons):
    outbox = tmp_path / "outbox"
    common = dict(destinations=folder_destination("archive", outbox), batch_size=5)
    a = daemons(pipeline_config(tmp_path, postgres_url, tiny_model, **common), tmp_path / "a.toml")
    b = daemons(pipeline_config(tmp_path, postgres_url, tiny_model, **common), tmp_path / "b.toml")
    actors = {f"service:{socket.gethostname()}:{d.process.pid}": name for name, d in (("A", a), ("B", b))}
    logs = lambda: f"--- A ---\n{a.log}\n--- B ---\n{b.log}"  # noqa: E731
    studies = [make_study(tmp_path / f"study{s}", [(LESIONS[(s + i) % 5], "jpeg") for i in range(PER_STUDY)],
                          rows=64, cols=80, seed=100 * s, patient_id=f"GL-E2E-{s}") for s in range(STUDIES)]
    files = [path for study in studies for path in study.files]
    sop_uids = {uid for study in studies for uid in study.sop_uids}
    view = DatabaseView(postgres_url)
    try:
        sent = storescu(a.port, *files)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: view.everything_sent(len(files), STUDIES), 180, "all 50 images processed and delivered",
                 logs=logs)

        # Exactly one result and one `done` event per image; each claimed once, never reclaimed.
        assert view.results_per_instance() == {uid: 1 for uid in sop_uids}
        done = view.events(AuditEventType.INSTANCE_DONE)
        assert Counter(e.sop_uid for e in done) == {uid: 1 for uid in sop_uids}
        claimed = view.events(AuditEventType.INSTANCE_CLAIMED, AuditEventType.INSTANCE_RECLAIMED)
        assert Counter((e.event_type.value, e.sop_uid) for e in claimed) == {
            (AuditEventType.INSTANCE_CLAIMED.value, uid): 1 for uid in sop_uids}
        by_worker = Counter(actors.get(e.actor, e.actor) for e in done)
        print(f"instances done per process: {dict(by_worker)}")
        assert set(by_worker) == {"A", "B"}, f"both processes should have worked: {dict(by_worker)}"
        for event in done:  # the worker that finished an image is the one that claimed it
            (claim,) = [c for c in claimed if c.sop_uid == event.sop_uid]
            assert claim.actor == event.actor

        # Outputs: one set per image, one study SR revision per study, each delivered once.
        outputs = view.outputs()
        kinds = output_kinds(outputs)
        assert kinds["sr"] == kinds["overlay"] == len(files)
        study_srs = [(o.study_id, o.revision) for o in outputs if o.kind.value == "study_sr"]
        assert len(study_srs) == len(set(study_srs)), f"a study SR revision was written twice: {study_srs}"
        assert len({study for study, _ in study_srs}) == STUDIES
        reported = view.events(AuditEventType.STUDY_REPORTED)
        assert len(reported) == len(study_srs)
        deliveries = view.deliveries()
        assert len(deliveries) == len(outputs) and {d.state.value for d, _ in deliveries} == {"sent"}
        sent_events = Counter(detail(e)["delivery_id"] for e in view.events(AuditEventType.DELIVERY_SENT))
        assert sent_events == {d.id: 1 for d, _ in deliveries}
        delivered = sorted(p.stem for p in outbox.rglob("*.dcm"))
        assert delivered == sorted(o.sop_instance_uid for o in outputs)

        assert view.audit_intact()
        assert a.stop() == 0 and b.stop() == 0, logs()

        retention_in_two_workers_at_once(a.config, postgres_url, len(files) + len(outputs))
        assert view.audit_intact()
    finally:
        view.close()


def retention_in_two_workers_at_once(config: Path, url: str, rows: int) -> None:
    """Two retention passes started together 40 days on: every row retired once, every file gone once."""
    from gastrolens.config import load_settings
    from gastrolens.config.schema import RetentionSettings
    from gastrolens.daemon.retention import RetentionStep
    from gastrolens.db import Database
    from gastrolens.db.tables import utcnow
    from gastrolens.storage.store import INSTANCES, OUTPUTS, Store

    settings = load_settings(config, environ={})
    settings = settings.model_copy(update={"retention": RetentionSettings(enabled=True, days=30)})
    root = settings.storage.root
    databases = [Database(url), Database(url)]
    steps = [RetentionStep(settings, db, Store(root), f"retention-{i}") for i, db in enumerate(databases)]
    later = utcnow() + timedelta(days=40)
    start = threading.Barrier(len(steps))
    removed: list[int] = [0] * len(steps)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            start.wait(timeout=30)
            removed[index] = steps[index].run_once(now=later)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(steps))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for db in databases:
        db.dispose()
    assert not errors, errors
    assert sum(removed) == rows, f"removals per worker {removed}, rows {rows}"
    view = DatabaseView(url)
    try:
        events = [detail(e) for e in view.events(AuditEventType.RETENTION_REMOVED)]
    finally:
        view.close()
    per_row = Counter((e["kind"], e["id"]) for e in events)
    assert len(per_row) == rows and set(per_row.values()) == {1}, f"retired twice: {per_row.most_common(3)}"
    left = [p for area in (INSTANCES, OUTPUTS) for p in (root / area).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    assert left == [], left[:5]
