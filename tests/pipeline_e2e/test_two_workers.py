"""Two `gastrolens serve` processes on one PostgreSQL database and one storage root.

All images go to process A; both processes claim from the shared queue (FOR UPDATE SKIP
LOCKED). Every image is processed exactly once, whoever took it.
"""

from __future__ import annotations

import socket
from collections import Counter

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
    finally:
        view.close()
