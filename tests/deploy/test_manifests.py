"""The deployment files as a cluster and compose read them: rendered, parsed and checked, no containers.

Runs in ``make test`` (kustomize through ``kubectl kustomize``; skipped where kubectl is absent).
``tests/deploy/test_containers.py`` runs the same manifests with podman.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

from gastrolens.config import load_settings
from gastrolens.config.schema import ServiceRole
from support import REPO

KUBE = REPO / "deploy" / "kubernetes"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) not installed")


def _render(overlay: str) -> dict[tuple[str, str], dict]:
    from deploy.kube_podman import kustomize

    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in kustomize(KUBE / "overlays" / overlay)}


def _container(doc: dict) -> dict:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@needs_kubectl
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_a_complete_node(overlay: str) -> None:
    docs = _render(overlay)
    assert {kind for kind, _ in docs} == {"ConfigMap", "Secret", "PersistentVolumeClaim", "Job", "Deployment",
                                          "Service", "PodDisruptionBudget"}
    assert docs["PersistentVolumeClaim", "gastrolens-storage"]["spec"]["accessModes"] == ["ReadWriteMany"]
    job = _container(docs["Job", "gastrolens-db-upgrade"])
    assert job["args"] == ["db", "upgrade"]
    for role in ("receiver", "worker"):
        deployment = docs["Deployment", f"gastrolens-{role}"]
        template = deployment["spec"]["template"]
        container = _container(deployment)
        assert container["args"] == ["serve", "--role", role]
        for probe in ("readinessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["path"] == "/healthz", (role, probe)
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez", role  # no restarts for a database outage
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        env = _env(container)
        assert env["GASTROLENS_DATABASE__URL"] == {"secretKeyRef": {"name": "gastrolens-secrets",
                                                                    "key": "database-url"}}
        assert env["GASTROLENS_API__TOKENS"] == {"secretKeyRef": {"name": "gastrolens-secrets", "key": "api-tokens"}}
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert template["spec"]["terminationGracePeriodSeconds"] >= 60
        pdb = docs["PodDisruptionBudget", f"gastrolens-{role}"]
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == role
    receiver = _container(docs["Deployment", "gastrolens-receiver"])
    assert "nvidia.com/gpu" not in str(receiver["resources"])
    service = docs["Service", "gastrolens-dicom"]["spec"]
    assert service["ports"][0]["port"] == 11112 and service["selector"]["app.kubernetes.io/component"] == "receiver"
    worker = _container(docs["Deployment", "gastrolens-worker"])
    gpus = worker["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) if overlay == "gpu" else (gpus is None and "nvidia.com/gpu" not in str(worker["resources"]))
    assert _env(worker)["GASTROLENS_MODEL__DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")


@needs_kubectl
def test_the_configmap_is_valid_settings_that_leave_migrations_to_the_job(tmp_path: Path) -> None:
    docs = _render("cpu")
    text = docs["ConfigMap", "gastrolens-config"]["data"]["gastrolens.toml"]
    config = tmp_path / "gastrolens.toml"
    # The volume's path does not exist here.
    config.write_text(text.replace('"/var/lib/gastrolens/storage"', f'"{tmp_path / "storage"}"'))
    settings = load_settings(config, environ={"GASTROLENS_DATABASE__URL": "postgresql+psycopg://u@db/gastrolens"})
    assert settings.daemon.migrate_on_start is False
    assert settings.daemon.role is ServiceRole.ALL  # each Deployment names its role on the command line
    assert settings.api.enabled and settings.api.bind == "0.0.0.0" and settings.logging.format == "json"


@pytest.mark.parametrize("path", ["deploy/container/gastrolens.toml", "deploy/compose/gastrolens.toml"])
def test_shipped_settings_files_are_valid(path: str, tmp_path: Path) -> None:
    text = (REPO / path).read_text().replace('"/var/lib/gastrolens/storage"', f'"{tmp_path / "storage"}"')
    text = text.replace("sqlite:////var/lib/gastrolens/gastrolens.db", f"sqlite:///{tmp_path / 'g.db'}")
    config = tmp_path / "gastrolens.toml"
    config.write_text(text)
    settings = load_settings(config, environ={})
    assert settings.logging.format == "json" and settings.dicom.bind == "0.0.0.0"


def test_compose_runs_migrations_once_then_the_node_with_postgres_and_orthanc() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "db-upgrade", "gastrolens", "orthanc"}
    assert services["db-upgrade"]["command"] == ["db", "upgrade"]
    assert services["gastrolens"]["depends_on"]["db-upgrade"]["condition"] == "service_completed_successfully"
    assert services["gastrolens"]["build"]["dockerfile"] == "deploy/container/Containerfile"
    assert (REPO / "deploy" / "container" / "Containerfile").is_file()
    settings = tomllib.loads((REPO / "deploy" / "compose" / "gastrolens.toml").read_text())
    assert settings["destinations"][0]["host"] == "orthanc"


def test_containerfile_runs_as_non_root_with_the_venv_only() -> None:
    text = (REPO / "deploy" / "container" / "Containerfile").read_text()
    final = text[text.rindex("\nFROM "):]
    assert "USER 10001" in final and "STOPSIGNAL SIGTERM" in final
    assert "ARG BASE=docker.io/library/debian:bookworm-slim" in text
    for tool in ("gcc", "build-essential", "python3-dev", "python3-venv", "pip install"):
        assert tool not in final, f"the runtime stage must not install {tool}"
