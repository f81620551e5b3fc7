"""The container image and the Kubernetes manifests, run for real with ``podman kube play``.

``make test-deploy`` runs this (marker ``deploy``; skipped in ``make test``). It builds the
image (scripts/build-image.sh, the Debian base image built locally with debootstrap), renders
the CPU overlay with ``kubectl kustomize``, adapts it for podman (:mod:`deploy.kube_podman`),
runs the migration Job, then receiver x1 and worker x2 against a fresh PostgreSQL database of
the machine's server and a shared host folder as the ReadWriteMany volume. It pushes 100
images with DCMTK storescu and checks each has exactly one result and every output reached a
DCMTK storescp; then it kills one worker (SIGKILL) while it holds claims and checks the other
finishes them once their lease expires; last it stops the receiver and the surviving worker
with SIGTERM and checks each drains and exits 0 inside its grace period. Figures are printed
and written to test-artifacts/deploy-figures.json.

A pytest module rather than a shell script: fixtures tear every pod, volume, database and
folder down even when an assertion fails, and the checks reuse the end-to-end tests' helpers
(DatabaseView, make_study, storescp).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy

from deploy.kube_podman import PODMAN, PodSpec, kustomize, podman_documents, to_yaml
from gastrolens.db.states import AuditEventType
from pipeline_e2e.peers import DatabaseView, StoreSCP, detail, make_study, start_storescp, wait_for
from support import POSTGRES_ADMIN_URL, REPO, free_port, storescu

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.postgres]

IMAGE = os.environ.get("GASTROLENS_DEPLOY_IMAGE", "localhost/gastrolens:dev")
OVERLAY = REPO / "deploy" / "kubernetes" / "overlays" / "cpu"
STUDIES, PER_STUDY = 10, 10
LEASE_SECONDS = 15
FIGURES: dict[str, object] = {}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image (layers cached by podman: a rebuild after a code change redoes only the last ones).

    ``GASTROLENS_DEPLOY_SKIP_BUILD=1`` uses the image as it is (iterating on this test).
    """
    if os.environ.get("GASTROLENS_DEPLOY_SKIP_BUILD") == "1":
        FIGURES["build_seconds"] = "skipped"
        _image_size()
        return IMAGE
    began = time.monotonic()
    built = subprocess.run(["bash", str(REPO / "scripts" / "build-image.sh"), IMAGE], capture_output=True,
                           text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    cached = sum(line.startswith("--> Using cache") for line in built.stdout.splitlines())
    FIGURES["build_seconds"] = round(time.monotonic() - began, 1)
    FIGURES["build_cached_steps"] = cached
    _image_size()
    return IMAGE


def _image_size() -> None:
    size = subprocess.run([*PODMAN, "image", "inspect", "--format", "{{.Size}}", IMAGE], capture_output=True,
                          text=True, check=True).stdout.strip()
    FIGURES["image_bytes"] = int(size)
    FIGURES["image_gib"] = round(int(size) / 1024**3, 2)


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    name = f"gl_deploy_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shared storage volume: a host folder the containers' user (10001) owns."""
    folder = Path(tmp_path_factory.mktemp("deploy")) / "volume"
    folder.mkdir()
    os.chown(folder, 10001, 10001)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def storescp_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    scp = start_storescp(Path(tmp_path_factory.mktemp("storescp")), unique_names=True)
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def model_package(volume: Path) -> str:
    """A small untrained package on the shared volume (64 px inputs: the pipeline, not the networks, is measured)."""
    from gastrolens.models import save_package, untrained_package

    folder = volume / "models" / "tiny"
    save_package(untrained_package(classifier_input_size=64, segmenter_input_size=65), folder)
    for path in [volume / "models", *folder.rglob("*"), folder]:
        os.chown(path, 10001, 10001)
    return "/var/lib/gastrolens/models/tiny"


class Cluster:
    """The played pods, their ports, and everything to tear down."""

    def __init__(self, specs: list[PodSpec]) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.played: list[Path] = []
        self.volumes_before = set(_podman("volume", "ls", "-q").split())

    def api(self, name: str) -> str:
        return f"http://127.0.0.1:{self.specs[name].api_port}"

    def health(self, name: str) -> dict | None:
        try:
            response = httpx.get(f"{self.api(name)}/healthz", timeout=5)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def logs(self, name: str) -> str:
        spec = self.specs[name]
        done = subprocess.run([*PODMAN, "logs", f"{name}-{spec.container}"], capture_output=True, text=True)
        return (done.stdout + done.stderr)[-8000:]

    def all_logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.logs(name)}" for name in self.specs)

    def teardown(self) -> None:
        for name in self.specs:
            subprocess.run([*PODMAN, "pod", "rm", "--force", "--time", "5", name], capture_output=True, timeout=120)
        for volume in set(_podman("volume", "ls", "-q").split()) - self.volumes_before:
            subprocess.run([*PODMAN, "volume", "rm", "--force", volume], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def cluster(image: str, database_url: str, volume: Path, storescp_peer: StoreSCP, model_package: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = Path(tmp_path_factory.mktemp("kube"))
    dicom_port = free_port()
    common_env = {
        "GASTROLENS_DATABASE__URL": database_url,
        "GASTROLENS_MODEL__PACKAGE": model_package,
        "GASTROLENS_MODEL__CPU_THREADS": "1",
        "GASTROLENS_MODEL__BATCH_SIZE": "8",
        "GASTROLENS_SCHEDULER__INTERVAL_SECONDS": "0.5",
        "GASTROLENS_SCHEDULER__STUDY_QUIET_SECONDS": "2",
        "GASTROLENS_SCHEDULER__LEASE_SECONDS": str(LEASE_SECONDS),
        "GASTROLENS_SCHEDULER__DECODE_PROCESSES": "1",
        "GASTROLENS_SCHEDULER__OUTPUT_PROCESSES": "1",
        "GASTROLENS_STORAGE__MIN_FREE_MB": "1",
        "GASTROLENS_DICOM__PORT": str(dicom_port),
        "GASTROLENS_DELIVERY__BACKOFF_SECONDS": "0.5",
    }
    destination = (f'\n[[destinations]]\nname = "scp"\nae_title = "{storescp_peer.ae_title}"\n'
                   f'host = "127.0.0.1"\nport = {storescp_peer.port}\n')
    rendered = kustomize(OVERLAY)
    pods = {"gastrolens-receiver": 1, "gastrolens-worker": 2}
    job_docs, job_specs = podman_documents(rendered, image=image, volume=volume, env=common_env, replicas={},
                                           jobs=True, api_port=free_port, config_append=destination)
    docs, specs = podman_documents(rendered, image=image, volume=volume, env=common_env, replicas=pods,
                                   jobs=False, api_port=free_port, config_append=destination)
    for spec in specs:
        if spec.name.startswith("gastrolens-receiver"):
            spec.dicom_port = dicom_port
    cluster = Cluster([*job_specs, *specs])
    try:
        # The migration Job first, as on Kubernetes: the replicas refuse a schema they would have to migrate.
        (job,) = job_specs
        job_yaml = folder / "job.yaml"
        job_yaml.write_text(to_yaml(job_docs))
        _podman("kube", "play", str(job_yaml), timeout=300)
        exit_code = _podman("wait", f"{job.name}-{job.container}", timeout=300).strip()
        assert exit_code == "0", cluster.logs(job.name)

        pods_yaml = folder / "pods.yaml"
        pods_yaml.write_text(to_yaml(docs))
        began = time.monotonic()
        _podman("kube", "play", str(pods_yaml), timeout=600)
        names = [spec.name for spec in specs]
        wait_for(lambda: all(cluster.health(name) for name in names), 300,
                 "every pod's /healthz answering 200 ok", logs=cluster.all_logs)
        FIGURES["kube_play_to_ready_seconds"] = round(time.monotonic() - began, 1)
        yield cluster
    finally:
        cluster.teardown()


@pytest.fixture(scope="module")
def view(database_url: str) -> Iterator[DatabaseView]:
    view = DatabaseView(database_url)
    yield view
    view.close()


def _podman(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _push(port: int, studies: list, associations: int = 4) -> float:
    """Send each study in its own association, ``associations`` at a time; the seconds it took."""
    began = time.monotonic()
    with ThreadPoolExecutor(associations) as pool:
        for sent in pool.map(lambda study: storescu(port, *study.files), studies):
            assert sent.returncode == 0, sent.stderr
    return time.monotonic() - began


def _hostname(actor: str) -> str:
    return actor.split(":")[1]


def _report() -> None:
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "deploy-figures.json").write_text(json.dumps(FIGURES, indent=2) + "\n")
    print("\ndeploy figures: " + json.dumps(FIGURES))


# -- tests --------------------------------------------------------------------------------------------


def test_roles_report_their_own_parts(cluster: Cluster, view: DatabaseView) -> None:
    receiver = cluster.health("gastrolens-receiver-0")
    assert receiver and receiver["role"] == "receiver", receiver
    assert set(receiver["components"]) == {"database", "storage", "receiver"}
    for name in ("gastrolens-worker-0", "gastrolens-worker-1"):
        worker = cluster.health(name)
        assert worker and worker["role"] == "worker", worker
        assert set(worker["components"]) == {"database", "storage", "scheduler", "model"}
    loaded = {_hostname(e.actor) for e in view.events(AuditEventType.MODEL_LOADED)}
    assert loaded == {"gastrolens-worker-0", "gastrolens-worker-1"}, "the receiver must not load a model"
    upgraded = view.events(AuditEventType.DATABASE_UPGRADED)
    assert len(upgraded) == 1, "one migration, by the Job"
    # Logs are JSON lines on stderr, which the runtime collects.
    lines = [line for line in cluster.logs("gastrolens-receiver-0").splitlines() if line.startswith("{")]
    assert lines and all("level" in json.loads(line) for line in lines)


def test_100_images_each_processed_once_and_delivered(cluster: Cluster, view: DatabaseView, storescp_peer: StoreSCP,
                                                      tmp_path: Path) -> None:
    studies = [make_study(tmp_path / f"study{s}", [(None, "jpeg")] * PER_STUDY, seed=10 * s,
                          patient_id=f"GL-DEPLOY-{s}") for s in range(STUDIES)]
    images = STUDIES * PER_STUDY
    began = time.monotonic()
    port = cluster.specs["gastrolens-receiver-0"].dicom_port
    sent_seconds = _push(port, studies)
    wait_for(lambda: view.everything_sent(images, STUDIES), 600, "100 images processed and delivered",
             logs=cluster.all_logs)
    total = time.monotonic() - began
    FIGURES["ingest_images_per_second"] = round(images / sent_seconds, 1)
    FIGURES["end_to_end_images_per_second"] = round(images / total, 1)
    FIGURES["end_to_end_seconds_100_images"] = round(total, 1)

    sop_uids = {uid for study in studies for uid in study.sop_uids}
    assert view.results_per_instance() == {uid: 1 for uid in sop_uids}
    done = view.events(AuditEventType.INSTANCE_DONE)
    assert Counter(e.sop_uid for e in done) == {uid: 1 for uid in sop_uids}
    by_worker = Counter(_hostname(e.actor) for e in done)
    FIGURES["images_per_worker"] = dict(by_worker)
    assert set(by_worker) == {"gastrolens-worker-0", "gastrolens-worker-1"}, by_worker

    outputs = view.outputs()
    delivered = Counter(_sop_of(path) for path in storescp_peer.received())
    assert delivered == {o.sop_instance_uid: 1 for o in outputs}, "every output delivered exactly once"
    assert view.audit_intact()
    FIGURES["memory_mib"] = _memory(cluster)
    _report()


def test_a_killed_worker_leaves_its_images_to_the_other(cluster: Cluster, view: DatabaseView,
                                                        storescp_peer: StoreSCP, tmp_path: Path) -> None:
    before = view.instance_states()["done"]
    studies = [make_study(tmp_path / f"late{s}", [(None, "jpeg")] * PER_STUDY, seed=1000 + 10 * s,
                          patient_id=f"GL-KILL-{s}") for s in range(4)]
    victim, survivor = "gastrolens-worker-0", "gastrolens-worker-1"
    port = cluster.specs["gastrolens-receiver-0"].dicom_port
    pushing = threading.Thread(target=_push, args=(port, studies, 2))
    pushing.start()
    wait_for(lambda: _claimed_by(view, victim) > 0, 120, f"{victim} holding claims", logs=cluster.all_logs)
    held = _claimed_by(view, victim)
    _podman("kill", "--signal", "KILL", f"{victim}-gastrolens")
    killed_at = time.monotonic()
    pushing.join(timeout=300)
    images = before + 4 * PER_STUDY
    wait_for(lambda: view.everything_sent(images, STUDIES + 4), 300 + LEASE_SECONDS,
             "the surviving worker finishing every image", logs=cluster.all_logs)
    FIGURES["killed_worker_claims"] = held
    FIGURES["kill_to_all_done_seconds"] = round(time.monotonic() - killed_at, 1)

    reclaimed = view.events(AuditEventType.INSTANCE_RECLAIMED)
    assert reclaimed, "the survivor should have taken over the dead worker's claims"
    assert {_hostname(e.actor) for e in reclaimed} == {survivor}
    assert all(_hostname(detail(e)["previous_owner"]) == victim for e in reclaimed)
    results = view.results_per_instance()
    assert len(results) == images and set(results.values()) == {1}, "each image exactly one result"
    outputs = view.outputs()
    delivered = Counter(_sop_of(path) for path in storescp_peer.received())
    assert set(delivered) == {o.sop_instance_uid for o in outputs}, "every output delivered"
    # A worker killed between sending an object and recording it sends that one object again: at most one.
    assert sum(delivered.values()) - len(outputs) <= 1, delivered.most_common(3)
    assert view.audit_intact()
    _report()


def _memory(cluster: Cluster) -> dict[str, object]:
    """Each pod's container memory now (podman stats), or why it could not be read."""
    found: dict[str, object] = {}
    for name, spec in cluster.specs.items():
        if spec.api_port is None:
            continue
        done = subprocess.run([*PODMAN, "stats", "--no-stream", "--no-reset", "--format", "{{.MemUsage}}",
                               f"{name}-{spec.container}"], capture_output=True, text=True, timeout=60)
        found[name] = done.stdout.strip() if done.returncode == 0 else f"unavailable: {done.stderr.strip()[:120]}"
    return found


def _claimed_by(view: DatabaseView, host: str) -> int:
    """Instances the worker on ``host`` holds claims on now."""
    from sqlalchemy import func, select

    from gastrolens.db.states import InstanceState
    from gastrolens.db.tables import Instance

    with view.db.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance).where(
            Instance.state == InstanceState.CLAIMED, Instance.claimed_by.like(f"service:{host}:%"))) or 0)


def _sop_of(path: Path) -> str:
    """storescp names files <modality>.<SOP Instance UID>[.<n>] with +uf unique names."""
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_sigterm_drains_within_the_grace_period(cluster: Cluster, view: DatabaseView) -> None:
    """`podman stop` sends the image's STOPSIGNAL (SIGTERM) through tini: each role drains and exits 0
    well inside the manifests' terminationGracePeriodSeconds (receiver 60 s, worker 120 s)."""
    grace = {"gastrolens-receiver-0": 60, "gastrolens-worker-1": 120}
    seconds = {}
    for name, limit in grace.items():
        container = f"{name}-{cluster.specs[name].container}"
        began = time.monotonic()
        _podman("stop", "--time", str(limit), container, timeout=limit + 30)
        seconds[name] = round(time.monotonic() - began, 1)
        code = _podman("inspect", "--format", "{{.State.ExitCode}}", container).strip()
        assert code == "0", f"{name} exited with {code} after SIGTERM:\n{cluster.logs(name)}"
        assert seconds[name] < limit, f"{name} took {seconds[name]} s to stop"
    FIGURES["sigterm_to_exit_seconds"] = seconds
    stopped = [detail(e) for e in view.events(AuditEventType.SERVICE_STOPPED)]
    assert len(stopped) == 2 and all(d["exit_status"] == 0 for d in stopped), stopped
    _report()
