"""KubeRay objects: their schemas, the operator's rules, the pinned Ray version."""

from __future__ import annotations

import pytest
from kustomize_helpers import (
    K8S_VERSION,
    KUBERAY_KINDS,
    TARGETS,
    constraint_pin,
    marn_commands,
    needs_kubectl,
    parse_marn_command,
    pinned_ray_version,
    ray_cluster_specs,
    render,
    source_docs,
    validate_kuberay,
)

# -------------------------------------------------------------------------------------------- KubeRay


def test_base_sources_validate_without_kubectl() -> None:
    """The same schema checks on the base as written, so they run where kubectl is missing too."""
    import kubernetes_validate

    docs = source_docs()
    assert {d["kind"] for d in docs} >= set(KUBERAY_KINDS)
    for doc in docs:
        if doc["kind"] in KUBERAY_KINDS:
            validate_kuberay(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_base_sources_run_valid_marn_commands_without_kubectl() -> None:
    found = sorted(parse_marn_command(argv) for doc in source_docs() for _, argv in marn_commands(doc))
    assert found == [["pipeline", "schedule"], ["train"], ["tune"]]


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_kinds_match_their_schemas(target: str) -> None:
    docs = [d for d in render(target) if d["kind"] in KUBERAY_KINDS]
    assert {d["kind"] for d in docs} == set(KUBERAY_KINDS)
    for doc in docs:
        validate_kuberay(doc)


@needs_kubectl
@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("RayCluster", lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs"))),
        ("RayCluster", lambda d: d["spec"]["headGroupSpec"].update(replicas=1)),  # heads have no replicas
        ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=1)),
        (
            "RayCluster",
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(img="x"),
        ),
        ("RayJob", lambda d: d["spec"].update(rayClusterSpec={"rayVersion": "2.60.0", "headGroupSpec": {}})),
        ("RayJob", lambda d: d["spec"].pop("clusterSelector")),
        ("RayJob", lambda d: d["spec"].update(submissionMode="K8sMode")),
        ("RayService", lambda d: d["spec"].update(serveConfig={})),
        ("RayService", lambda d: d["spec"]["rayClusterConfig"].update(rayVersion="latest")),
    ],
)
def test_kuberay_schemas_reject_misspelt_or_misplaced_fields(kind: str, mutate) -> None:
    doc = next(d for d in render("base") if d["kind"] == kind)
    validate_kuberay(doc)
    mutate(doc)
    with pytest.raises(ValueError):
        validate_kuberay(doc)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_kuberay_rules_the_operator_enforces(target: str) -> None:
    """What KubeRay's webhook/controller would reject at apply time, or that would make it misbehave."""
    docs = render(target)
    clusters = {d["metadata"]["name"] for d in docs if d["kind"] == "RayCluster"}
    for doc in docs:
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            selected = spec.get("clusterSelector", {}).get("ray.io/cluster")
            assert selected in clusters, (
                f"RayJob {doc['metadata']['name']} selects a missing RayCluster {selected}"
            )
            assert not spec.get("suspend"), "a clusterSelector RayJob cannot be suspended"
            assert not spec.get("shutdownAfterJobFinishes"), "the selected cluster outlives the job"
            assert not spec.get("ttlSecondsAfterFinished"), "a TTL needs shutdownAfterJobFinishes"
        for cluster in ray_cluster_specs(doc):
            groups = cluster.get("workerGroupSpecs", [])
            assert len({g["groupName"] for g in groups}) == len(groups)
            autoscaling = cluster.get("enableInTreeAutoscaling", False)
            for group in groups:
                low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
                assert low <= high, group["groupName"]
                if autoscaling:
                    assert "replicas" not in group, f"{group['groupName']}: the autoscaler owns replicas"
                    # Autoscaler v2 (Ray >= 2.47) replaces failed worker pods; it needs them not restarted.
                    assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"
                else:
                    assert low <= group["replicas"] <= high, group["groupName"]
            if autoscaling:
                resources = cluster["autoscalerOptions"]["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_ray_version_is_the_one_pyproject_pins(target: str) -> None:
    version = pinned_ray_version()
    versions = [c["rayVersion"] for d in render(target) for c in ray_cluster_specs(d)]
    assert len(versions) >= 2  # the RayCluster and the RayService's cluster
    assert set(versions) == {version}
    assert constraint_pin("ray") == version  # and the image installs exactly that Ray
