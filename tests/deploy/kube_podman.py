"""The Kubernetes manifests, rendered by ``kubectl kustomize``, adapted for ``podman kube play`` (podman 4.3).

What podman cannot take as Kubernetes does, and what this does instead (all of it test plumbing;
the manifests themselves stay as a cluster takes them):

- a Deployment gives ``replicas`` Pods named ``<deployment>-<n>``, each with its own hostname
  (the worker's identity in claims and the audit trail) and its own API port: the pods share the
  host's network, as podman runs here, so two cannot both listen on 8080;
- ``secretKeyRef`` is resolved from the Secret in the same render into a plain value (podman 4.3
  stores a played Secret in a form its own ``secretKeyRef`` lookup then fails to parse);
- the ReadWriteMany PersistentVolumeClaim becomes a host folder;
- probes are left out (podman would turn liveness probes into health checks that run ``curl``
  inside the image, which has none): the test polls ``/healthz`` itself, as the kubelet would;
- resource requests and limits are left out (the cgroup controllers are not delegated here);
- ``restartPolicy: Never``, so that a container the test kills stays dead;
- the test's own settings come as environment variables, and what a variable cannot say
  (``[[destinations]]``) is appended to the ConfigMap's file;
- a Job becomes a Pod that runs once; Services and PodDisruptionBudgets have no podman meaning
  and are checked by tests/deploy/test_manifests.py instead.
"""

from __future__ import annotations

import base64
import copy
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PODMAN = ["podman", "--runtime", "/usr/sbin/runc", "--cgroup-manager=cgroupfs"]

Doc = dict[str, Any]


@dataclass
class PodSpec:
    name: str
    container: str
    api_port: int | None
    dicom_port: int | None = None


def kustomize(overlay: Path) -> list[Doc]:
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def to_yaml(docs: list[Doc]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def secrets_of(docs: list[Doc]) -> dict[str, dict[str, str]]:
    found = {}
    for doc in docs:
        if doc["kind"] == "Secret":
            values = dict(doc.get("stringData") or {})
            values.update({k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()})
            found[doc["metadata"]["name"]] = values
    return found


def podman_documents(docs: list[Doc], *, image: str, volume: Path, env: Mapping[str, str],
                     replicas: Mapping[str, int], jobs: bool, api_port: Callable[[], int],
                     config_append: str = "") -> tuple[list[Doc], list[PodSpec]]:
    """ConfigMaps plus Pods: the Jobs' (``jobs``) or ``replicas[name]`` of each named Deployment."""
    secrets = secrets_of(docs)
    out = []
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            doc = copy.deepcopy(doc)
            doc["data"] = {key: value + config_append for key, value in doc["data"].items()}
            out.append(doc)
    specs: list[PodSpec] = []
    for doc in docs:
        name = doc["metadata"]["name"]
        if jobs and doc["kind"] == "Job":
            pods = [(name, doc["spec"]["template"])]
        elif not jobs and doc["kind"] == "Deployment" and name in replicas:
            pods = [(f"{name}-{n}", doc["spec"]["template"]) for n in range(replicas[name])]
        else:
            continue
        for pod_name, template in pods:
            port = None if jobs else api_port()
            pod, container = _pod(pod_name, template, image=image, volume=volume, secrets=secrets,
                                  env={**env, **({"GASTROLENS_API__PORT": str(port)} if port else {})})
            out.append(pod)
            specs.append(PodSpec(pod_name, container, port))
    return out, specs


def _pod(name: str, template: Doc, *, image: str, volume: Path, secrets: dict[str, dict[str, str]],
         env: Mapping[str, str]) -> tuple[Doc, str]:
    spec = copy.deepcopy(template["spec"])
    spec.update(hostNetwork=True, hostname=name, restartPolicy="Never")
    (container,) = spec["containers"]
    container["image"] = image
    container["imagePullPolicy"] = "IfNotPresent"
    for key in ("readinessProbe", "livenessProbe", "startupProbe", "resources", "ports"):
        container.pop(key, None)
    values: dict[str, str] = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        values[item["name"]] = secrets[ref["name"]][ref["key"]] if ref else item["value"]
    values.update(env)
    container["env"] = [{"name": k, "value": v} for k, v in values.items()]
    for vol in spec.get("volumes", []):
        if "persistentVolumeClaim" in vol:
            del vol["persistentVolumeClaim"]
            vol["hostPath"] = {"path": str(volume), "type": "Directory"}
    metadata = {"name": name, "labels": dict(template.get("metadata", {}).get("labels", {}))}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}, container["name"]
