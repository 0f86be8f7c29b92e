"""Pods and access: pinned images, resources, probes, RBAC, volumes, and the config they mount."""

from __future__ import annotations

import pytest
from kustomize_helpers import (
    CLUSTER_CONFIG,
    GPU,
    NAMESPACE,
    REDIS_IMAGE,
    TARGETS,
    containers,
    gpu_image,
    load_yaml_config,
    needs_kubectl,
    pod_templates,
    project_image,
    render,
    the,
)

# ------------------------------------------------------------------------------------- pods and access


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_image_is_pinned(target: str) -> None:
    images = set()
    for doc in render(target):
        for where, container in containers(doc):
            image = container["image"]
            images.add(image)
            wants_gpu = GPU in container["resources"].get("limits", {})
            if image.startswith("redis:"):
                assert REDIS_IMAGE.match(image), f"{where}: {image} is not an exact Redis release"
            elif wants_gpu:
                assert image == gpu_image(), f"{where}: GPU containers run {gpu_image()}, not {image}"
            else:
                assert image == project_image(), f"{where}: {image} is not {project_image()}"
    assert project_image() in images


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target: str) -> None:
    for doc in render(target):
        for where, container in containers(doc):
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: no cpu/memory {bound}"
            if GPU in resources.get("limits", {}):
                assert resources["requests"].get(GPU) == resources["limits"][GPU], where


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_deployments_and_statefulsets_have_probes(target: str) -> None:
    """Ray pods get KubeRay's probes; the long-running pods defined here need their own."""
    services = [d for d in render(target) if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(services) == 1  # Redis; the feature server is gone (serving reads Feast in-process)
    for doc in services:
        for where, container in containers(doc):
            assert "readinessProbe" in container, f"{where}: no readiness probe"
            assert "livenessProbe" in container, f"{where}: no liveness probe"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_rbac_is_least_privilege(target: str) -> None:
    docs = render(target)
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "namespaced access only"
    for role in (d for d in docs if d["kind"] == "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"Role {role['metadata']['name']} grants * {field}"
            assert not set(rule["verbs"]) & {"delete", "deletecollection", "escalate", "bind", "impersonate"}

    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        for subject in binding["subjects"]:
            assert subject["name"] in accounts and subject["namespace"] == NAMESPACE
    # Only the Ray heads talk to the Kubernetes API (their autoscaler); every other pod gets no token.
    with_token = {"marn-ray-head", "marn-serve-head"}
    for doc in docs:
        for where, template in pod_templates(doc):
            account = template["spec"].get("serviceAccountName")
            assert account in accounts, f"{where}: runs as {account or 'default'}, not one of ours"
            mounted = template["spec"].get(
                "automountServiceAccountToken", accounts[account].get("automountServiceAccountToken", True)
            )
            assert mounted == (account in with_token), f"{where}: API token mounted={mounted}"
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True, where


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_volumes_point_at_the_config_and_the_shared_claim(target: str) -> None:
    docs = render(target)
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in docs:
        for where, template in pod_templates(doc):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for volume in volumes.values():
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, f"{where}: no ConfigMap {volume}"
                if "persistentVolumeClaim" in volume:  # the shared data, or the A/B ledger's own claim
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert claim == "marn-data" or (claim == "marn-ledger" and claim in claims), where
            claim_templates = doc["spec"].get("volumeClaimTemplates", [])  # a StatefulSet's own volumes
            volumes |= {c["metadata"]["name"]: {"volumeClaimTemplate": c} for c in claim_templates}
            for container in template["spec"]["containers"]:
                mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
                ray_pod = doc["kind"] in ("RayCluster", "RayService")
                # `marn ... --config /etc/marn/config.yaml` runs in Ray pods and the Job: the ConfigMap
                if ray_pod or doc["kind"] == "Job":
                    assert mounts["/etc/marn"]["configMap"]["name"] == "marn-config", where
                if ray_pod:
                    assert "persistentVolumeClaim" in mounts["/data"], f"{where}: no /data volume"
                    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where


# ----------------------------------------------------------------------------------------------- config


@needs_kubectl
@pytest.mark.parametrize("target", ["base", "overlays/prod", "overlays/canary"])
def test_config_map_is_the_cluster_config(target: str) -> None:
    config = the(render(target), "ConfigMap", "marn-config")["data"]["config.yaml"]
    assert config == CLUSTER_CONFIG.read_text()
    cfg = load_yaml_config(config)
    assert cfg.feast.online_store == "redis" and cfg.feast.redis_connection == "marn-redis:6379"
    assert str(cfg.paths.work_dir) == "/data/marn"


@needs_kubectl
def test_dev_config_is_the_cluster_config_sized_down() -> None:
    dev = load_yaml_config(the(render("overlays/dev"), "ConfigMap", "marn-config")["data"]["config.yaml"])
    cluster = load_yaml_config(CLUSTER_CONFIG.read_text())
    for section in ("paths", "ray", "feast", "pipeline"):  # what names cluster services, paths and arms
        assert getattr(dev, section) == getattr(cluster, section), f"dev config's {section} drifted"
    assert not dev.distributed.use_gpu and dev.embed.gpus_per_actor == 0  # no GPU group in dev
    assert dev.embed.backbone == "mobilenet_v2"
