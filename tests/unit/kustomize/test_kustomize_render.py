"""Rendering: every target renders the whole system, core kinds validate strictly."""

from __future__ import annotations

import pytest
import yaml
from kustomize_helpers import (
    K8S_VERSION,
    KUBERAY_KINDS,
    KUSTOMIZE,
    NAMESPACE,
    TARGETS,
    containers,
    needs_kubectl,
    project_image,
    render,
    the,
)

# ---------------------------------------------------------------------------------------- rendering


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders_the_whole_system(target: str) -> None:
    docs = render(target)
    kinds = [d["kind"] for d in docs]
    for kind in ("RayCluster", "RayService", "StatefulSet", "Job", "ConfigMap", "NetworkPolicy"):
        assert kind in kinds, f"{target}: no {kind}"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"} == {"marn-train", "marn-tune"}

    redis = the(docs, "Service", "marn-redis")
    assert [p["port"] for p in redis["spec"]["ports"]] == [6379]  # cluster.yaml feast.redis_connection
    assert the(docs, "StatefulSet", "marn-redis")["spec"]["template"]["spec"]["containers"][0]["image"]
    # Serving reads Feast in-process (serve/features.py): no feature server, which would expose every
    # user's history and accept feature writes.
    assert not [d for d in docs if "feature-server" in d["metadata"]["name"]]

    for doc in docs:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace") == NAMESPACE, (
                f"{target}: {doc['kind']} outside {NAMESPACE}"
            )


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_core_kinds_validate_strictly_against_kubernetes(target: str) -> None:
    import kubernetes_validate

    checked = 0
    for doc in render(target):
        if doc["kind"] in KUBERAY_KINDS:
            continue
        try:  # an unknown kind raises SchemaNotFoundError here: every kind must be checked by something
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']}: {'/'.join(map(str, err.path))}: {err.message}"
            )
        checked += 1
    assert checked >= 10


def test_storage_manifests_validate_strictly() -> None:
    import kubernetes_validate

    docs = [
        d
        for path in sorted((KUSTOMIZE / "storage").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["namespace"] == NAMESPACE
    pvc = the(docs, "PersistentVolumeClaim", "marn-data")  # the claim every workload mounts
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, container in containers(the(docs, "Pod")):
        assert container["image"] == project_image(), where
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), where


def test_strict_core_validation_can_fail() -> None:
    import kubernetes_validate

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c"}]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    pod["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
