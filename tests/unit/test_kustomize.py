"""Offline checks of the cluster deployment: kustomize/ (base, overlays dev/prod/canary, storage), the
Dockerfile, and what the manifests point at (the image tag, the Ray version, the serving app, the `marn`
commands they run).

Rendering needs `kubectl` (kustomize v5 inside); those tests skip without it. Core kinds are validated
strictly against Kubernetes K8S_VERSION's schemas (kubernetes-validate, offline); KubeRay kinds against
the JSON schemas in tests/unit/schemas/kuberay (kubernetes-validate has no schema for them), and every pod
template inside them strictly as a core PodTemplate.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import referencing
import typer
import typer.main
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "kustomize"
SCHEMAS = Path(__file__).parent / "schemas" / "kuberay"

# The oldest Kubernetes we deploy to. Validating against the oldest rather than the newest makes a field
# that only newer clusters accept fail here instead of at `kubectl apply`.
K8S_VERSION = "1.30"
NAMESPACE = "marn"
TARGETS = ("base", "overlays/dev", "overlays/prod", "overlays/canary")
KUBERAY_KINDS = {"RayCluster": "raycluster.json", "RayJob": "rayjob.json", "RayService": "rayservice.json"}
SERVE_DEPLOYMENTS = {"router", "marn_scorer", "dupn_scorer", "ab_ledger"}
REDIS_IMAGE = re.compile(r"^redis:\d+\.\d+\.\d+-alpine$")  # official image, exact release
GPU = "nvidia.com/gpu"

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: cannot render kustomize")


# --------------------------------------------------------------------------------------------- helpers


def project_image() -> str:
    from components.image import IMAGE

    return IMAGE


def gpu_image() -> str:
    """The GPU workers' tag: the same release built with the CUDA torch (Dockerfile TORCH_INDEX_URL)."""
    return project_image() + "-gpu"


def pinned_ray_version() -> str:
    """The Ray version pyproject.toml pins (ray[...]==X): the one source for every rayVersion."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        found = re.fullmatch(r"ray(\[[^\]]*\])?==([0-9.]+)", requirement.replace(" ", ""))
        if found:
            return found.group(2)
    raise AssertionError(f"pyproject.toml pins no ray version (ray[...]==X) in {dependencies}")


def constraint_pin(package: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"constraints.txt does not pin {package}")


@functools.cache
def _render_text(target: str) -> str:
    """`kubectl kustomize` with the load restrictor off: the ConfigMap reads ../../configs/cluster.yaml."""
    done = subprocess.run(
        [KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(KUSTOMIZE / target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {target} failed:\n{done.stderr}")
    return done.stdout


def render(target: str) -> list[dict[str, Any]]:
    """A fresh copy of the rendered documents (tests may mutate what they get)."""
    return [doc for doc in yaml.safe_load_all(_render_text(target)) if doc]


def source_docs() -> list[dict[str, Any]]:
    """The base's manifests as written (no kubectl needed): what every overlay starts from."""
    return [
        doc
        for path in sorted((KUSTOMIZE / "base").glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def source_serve_configs() -> dict[str, dict[str, Any]]:
    """Every serveConfigV2 in the sources: the base's and each overlay patch that replaces it."""
    found = {"base": serve_config(the(source_docs(), "RayService"))}
    for path in sorted((KUSTOMIZE / "overlays").glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for op in doc if isinstance(doc, list) else []:
                if op.get("path") == "/spec/serveConfigV2":
                    found[str(path.relative_to(KUSTOMIZE))] = yaml.safe_load(op["value"])
    return found


def the(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def ray_cluster_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The RayClusterSpecs inside a KubeRay object (a RayJob with clusterSelector has none)."""
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        yield spec
    elif doc["kind"] == "RayService":
        yield spec["rayClusterConfig"]
    elif doc["kind"] == "RayJob" and "rayClusterSpec" in spec:
        yield spec["rayClusterSpec"]


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod the object will create."""
    kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield f"{kind}/{name}", spec["template"]
    elif kind == "Pod":
        yield f"Pod/{name}", {"metadata": doc["metadata"], "spec": spec}
    for cluster in ray_cluster_specs(doc):
        yield f"{kind}/{name} head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{kind}/{name} {group['groupName']}", group["template"]
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        yield f"RayJob/{name} submitter", spec["submitterPodTemplate"]


def containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, template in pod_templates(doc):
        for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            yield f"{where} {container['name']}", container


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def router_user_config(serve: dict[str, Any]) -> dict[str, Any]:
    (app,) = serve["applications"]
    return next(d for d in app["deployments"] if d["name"] == "router")["user_config"]


def load_yaml_config(text: str):
    """The marn Config a ConfigMap's config.yaml gives (unknown keys are errors)."""
    import tempfile

    from marn.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        return load_config(path)


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    resources = []
    for path in SCHEMAS.glob("*.json"):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
    registry = referencing.Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / KUBERAY_KINDS[kind]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_kuberay(doc: dict[str, Any]) -> None:
    """Raise ValueError listing every schema violation of a KubeRay object (and of its pod templates)."""
    import kubernetes_validate

    validator = kuberay_validator(doc["kind"])
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)
    ]
    if not problems:
        for where, template in pod_templates(doc):
            pod_template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "check"},
                "template": template,
            }
            try:
                kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = "/".join(map(str, err.absolute_path))
                problems.append(f"{where}: {path}: {err.message}")
    if problems:
        raise ValueError(f"{doc['kind']}/{doc['metadata']['name']}:\n  " + "\n  ".join(problems))


# The `marn` command behind the Typer app, as Click sees it: parsing a command line with it checks the
# subcommand, required options, unknown options and option types without running anything. Typer 0.29
# vendors its own click, whose errors derive from typer.TyperException rather than click's.
CLI_ERRORS = (click.ClickException, getattr(typer, "TyperException", click.ClickException))


def parse_marn_command(line: str | list[str]) -> list[str]:
    """Parse a `marn ...` command line without running it: the subcommand path, or ValueError saying why."""
    import marn.cli

    argv = shlex.split(line) if isinstance(line, str) else list(line)
    if not argv or argv[0] != "marn":
        raise ValueError(f"not a marn command: {argv!r}")
    command, name, parent, args, path = typer.main.get_command(marn.cli.app), "marn", None, argv[1:], []
    try:
        while hasattr(command, "resolve_command"):  # a group: descend into the named subcommand
            ctx = command.make_context(name, list(args), parent=parent)
            protected = getattr(ctx, "_protected_args", None)
            if protected is None:
                protected = ctx.protected_args
            name, command, args = command.resolve_command(ctx, [*protected, *ctx.args])
            path.append(name)
            parent = ctx
        command.make_context(name, list(args), parent=parent)  # the leaf: options parsed and type-checked
    except CLI_ERRORS as err:
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise ValueError(f"{' '.join(argv)}: {message}") from None
    return path


def marn_commands(doc: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of everything that runs `marn`: RayJob entrypoints, containers whose command is marn."""
    if doc["kind"] == "RayJob":
        yield f"RayJob/{doc['metadata']['name']}", shlex.split(doc["spec"]["entrypoint"])
    for where, container in containers(doc):
        command = container.get("command", []) + container.get("args", [])
        if command[:1] == ["marn"]:
            yield where, command


# ---------------------------------------------------------------------------------------- rendering


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_target_renders_the_whole_system(target: str) -> None:
    docs = render(target)
    kinds = [d["kind"] for d in docs]
    for kind in ("RayCluster", "RayService", "StatefulSet", "Deployment", "Job", "ConfigMap"):
        assert kind in kinds, f"{target}: no {kind}"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"} == {"marn-train", "marn-tune"}

    redis = the(docs, "Service", "marn-redis")
    assert [p["port"] for p in redis["spec"]["ports"]] == [6379]  # cluster.yaml feast.redis_connection
    assert the(docs, "StatefulSet", "marn-redis")["spec"]["template"]["spec"]["containers"][0]["image"]
    feast = the(docs, "Deployment", "marn-feature-server")["spec"]["template"]["spec"]["containers"][0]
    assert feast["command"][:4] == ["feast", "-c", "/data/marn/feast", "serve"]
    assert [p["port"] for p in the(docs, "Service", "marn-feature-server")["spec"]["ports"]] == [6566]

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
    assert len(services) == 2
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
    for doc in docs:
        for where, template in pod_templates(doc):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for volume in volumes.values():
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, f"{where}: no ConfigMap {volume}"
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] == "marn-data", where
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
def test_config_map_is_configs_cluster_yaml(target: str) -> None:
    config = the(render(target), "ConfigMap", "marn-config")["data"]["config.yaml"]
    assert config == (ROOT / "configs" / "cluster.yaml").read_text()
    cfg = load_yaml_config(config)
    assert cfg.feast.online_store == "redis" and cfg.feast.redis_connection == "marn-redis:6379"
    assert str(cfg.paths.work_dir) == "/data/marn"


@needs_kubectl
def test_dev_config_is_the_cluster_config_sized_down() -> None:
    dev = load_yaml_config(the(render("overlays/dev"), "ConfigMap", "marn-config")["data"]["config.yaml"])
    cluster = load_yaml_config((ROOT / "configs" / "cluster.yaml").read_text())
    for section in ("paths", "ray", "feast", "pipeline"):  # what names cluster services, paths and arms
        assert getattr(dev, section) == getattr(cluster, section), f"dev config's {section} drifted"
    assert not dev.distributed.use_gpu and dev.embed.gpus_per_actor == 0  # no GPU group in dev
    assert dev.embed.backbone == "mobilenet_v2"


# ------------------------------------------------------------------------------------------------ serving


SERVE_FIELDS: dict[str, set[str]] = {}


def known_serve_fields() -> dict[str, set[str]]:
    """Field names of Ray Serve's config schema at each level (the schema itself ignores unknown keys)."""
    if not SERVE_FIELDS:
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import (
            DeploymentSchema,
            HTTPOptionsSchema,
            RayActorOptionsSchema,
            ServeApplicationSchema,
            ServeDeploySchema,
        )

        for level, model in {
            "config": ServeDeploySchema,
            "http_options": HTTPOptionsSchema,
            "application": ServeApplicationSchema,
            "deployment": DeploymentSchema,
            "ray_actor_options": RayActorOptionsSchema,
            "autoscaling_config": AutoscalingConfig,
        }.items():
            SERVE_FIELDS[level] = set(model.model_fields)
    return SERVE_FIELDS


def check_serve_config(serve: dict[str, Any]) -> None:
    """Ray Serve's own validation plus unknown-key checks, then what the A/B app expects."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve)
    fields = known_serve_fields()
    assert set(serve) <= fields["config"]
    assert set(serve.get("http_options", {})) <= fields["http_options"]
    assert serve["http_options"]["host"] == "0.0.0.0"  # KubeRay's serve Service reaches the proxies
    (app,) = serve["applications"]
    assert set(app) <= fields["application"]
    assert app["import_path"] == "serve.app:build_app"
    assert app["args"] == {"config": "/etc/marn/config.yaml"}
    assert {d["name"] for d in app["deployments"]} == SERVE_DEPLOYMENTS
    for deployment in app["deployments"]:
        assert set(deployment) <= fields["deployment"], deployment["name"]
        autoscaling = deployment.get("autoscaling_config", {})
        assert set(autoscaling) <= fields["autoscaling_config"], deployment["name"]
        options = deployment["ray_actor_options"]
        assert set(options) <= fields["ray_actor_options"], deployment["name"]
        assert 0 < options["num_cpus"] < 1, f"{deployment['name']}: fractional CPUs, so replicas pack"

    user_config = router_user_config(serve)
    assert set(user_config) == {"weights", "shadow"}
    cluster = load_yaml_config((ROOT / "configs" / "cluster.yaml").read_text())
    weights = user_config["weights"]
    assert set(weights) == {cluster.pipeline.model, cluster.pipeline.baseline}  # the arms the app serves
    assert all(0 <= w <= 1 for w in weights.values())
    assert sum(weights.values()) == pytest.approx(1.0)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_serve_config_is_valid_for_ray_serve_and_the_app(target: str) -> None:
    check_serve_config(serve_config(the(render(target), "RayService")))


@needs_kubectl
def test_serve_config_check_can_fail() -> None:
    serve = serve_config(the(render("base"), "RayService"))
    broken = copy.deepcopy(serve)
    router_user_config(broken)["weights"]["marn"] = 0.7  # shares no longer sum to 1
    with pytest.raises(AssertionError):
        check_serve_config(broken)
    broken = copy.deepcopy(serve)
    broken["applications"][0]["deployments"][0]["num_replica"] = 2  # Ray Serve itself ignores this typo
    with pytest.raises(AssertionError):
        check_serve_config(broken)


def test_rayservice_import_path_resolves_to_the_app_builder() -> None:
    configs = source_serve_configs()
    assert set(configs) == {"base", "overlays/dev/rayservice.yaml", "overlays/canary/rayservice.yaml"}
    for where, serve in configs.items():
        (app,) = serve["applications"]
        module_name, _, attribute = app["import_path"].partition(":")
        module = importlib.import_module(
            module_name
        )  # serve.app: the app's module, importable from the image
        assert callable(getattr(module, attribute, None)), f"{where}: {app['import_path']} is not callable"


# ----------------------------------------------------------------------------------------- marn commands


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_marn_command_in_the_manifests_parses(target: str) -> None:
    found = {}
    for doc in render(target):
        for where, argv in marn_commands(doc):
            found[where] = parse_marn_command(argv)
            assert argv[argv.index("--config") + 1] == "/etc/marn/config.yaml", where
    assert sorted(found.values()) == [["pipeline", "schedule"], ["train"], ["tune"]]


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("marn train --model marn --data /d --out /o --bogus 1", "bogus"),
        ("marn train --data /d --out /o", "model"),  # a required option missing
        ("marn trian --model marn --data /d --out /o", "trian"),
        ("marn train --model marn --data /d --out /o --workers four", "four"),
        ("marn pipeline schedul --host http://kfp", "schedul"),
        ("python -m marn train", "not a marn command"),
    ],
)
def test_marn_command_check_rejects_bad_commands(line: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_marn_command(line)


def test_marn_command_check_accepts_the_documented_commands() -> None:
    assert parse_marn_command("marn train --model marn --data d --out o --workers 4 --config c") == ["train"]
    assert parse_marn_command("marn pipeline schedule --host http://h --cron '0 0 3 * * *'") == [
        "pipeline",
        "schedule",
    ]


# ---------------------------------------------------------------------------------------------- overlays


def without_router_weights(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents with serveConfigV2 parsed and the router's weights blanked."""
    docs = copy.deepcopy(docs)
    for doc in docs:
        if doc["kind"] == "RayService":
            serve = serve_config(doc)
            router_user_config(serve)["weights"] = None
            doc["spec"]["serveConfigV2"] = serve
    return docs


@needs_kubectl
def test_canary_changes_only_the_router_weights() -> None:
    prod, canary = render("overlays/prod"), render("overlays/canary")
    assert without_router_weights(canary) == without_router_weights(prod)
    prod_weights = router_user_config(serve_config(the(prod, "RayService")))["weights"]
    canary_weights = router_user_config(serve_config(the(canary, "RayService")))["weights"]
    assert canary_weights != prod_weights
    assert canary_weights["marn"] < canary_weights["dupn"]  # a small share on the candidate


@needs_kubectl
def test_dev_serve_config_differs_from_base_only_in_replica_bounds() -> None:
    def bounds_blanked(serve: dict[str, Any]) -> dict[str, Any]:
        for deployment in serve["applications"][0]["deployments"]:
            for key in ("min_replicas", "max_replicas"):
                deployment.get("autoscaling_config", {}).pop(key, None)
        return serve

    base = serve_config(the(render("base"), "RayService"))
    dev = serve_config(the(render("overlays/dev"), "RayService"))
    assert base != dev
    assert bounds_blanked(dev) == bounds_blanked(base)


@needs_kubectl
def test_dev_is_small_and_cpu_only() -> None:
    docs = render("overlays/dev")
    groups = [
        g["groupName"] for d in docs for c in ray_cluster_specs(d) for g in c.get("workerGroupSpecs", [])
    ]
    assert "gpu-workers" not in groups and "cpu-workers" in groups
    total_cpu = 0.0
    for doc in docs:
        for cluster in ray_cluster_specs(doc):
            assert not cluster.get("enableInTreeAutoscaling")
        for where, container in containers(doc):
            limits = container["resources"]["limits"]
            assert GPU not in limits, where
            cpu = str(limits["cpu"])
            total_cpu += float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert total_cpu <= 12, f"dev asks for {total_cpu} CPUs (every pod at once)"


@needs_kubectl
def test_prod_has_gpu_workers_autoscaling_and_replicas() -> None:
    docs = render("overlays/prod")
    cluster = the(docs, "RayCluster", "marn-ray")["spec"]
    serving = the(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] and serving["enableInTreeAutoscaling"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == "1"
    cfg = load_yaml_config((ROOT / "configs" / "cluster.yaml").read_text())
    assert cfg.distributed.use_gpu and gpu["maxReplicas"] >= cfg.distributed.workers  # a GPU per worker
    assert gpu["maxReplicas"] >= cfg.embed.actors
    assert groups["cpu-workers"]["minReplicas"] >= 2
    assert serving["workerGroupSpecs"][0]["minReplicas"] >= 2
    assert the(docs, "Deployment", "marn-feature-server")["spec"]["replicas"] >= 2
    assert the(docs, "PodDisruptionBudget", "marn-feature-server")["spec"]["minAvailable"] == 1
    for deployment in serve_config(the(docs, "RayService"))["applications"][0]["deployments"]:
        if deployment["name"] != "ab_ledger":  # the ledger is one replica by design
            assert deployment["autoscaling_config"]["min_replicas"] >= 2, deployment["name"]


# ------------------------------------------------------------------------------------------------ image


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def test_dockerfile_pins_installs_with_constraints_and_runs_marn_unprivileged() -> None:
    """Docker is not on the test machines, so the image is checked by reading its Dockerfile."""
    instructions = dockerfile_instructions()
    (base,) = [args for keyword, args in instructions if keyword == "FROM"]
    python = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", base)
    assert python, f"FROM {base}: pin an exact Python release"
    assert f"{python[1]}.{python[2]}" == "3.11"  # what constraints.txt was resolved on

    runs = [args for keyword, args in instructions if keyword == "RUN"]
    pip_calls = [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]
    assert len(pip_calls) >= 3
    for call in pip_calls:
        assert "-c constraints.txt" in call, f"pip without the constraints file: {call}"
    torch = constraint_pin("torch")
    # torch first, from the chosen index (CPU or CUDA build)
    assert f"torch=={torch}" in pip_calls[0] and "${TORCH_INDEX_URL}" in pip_calls[0]
    assert any(keyword == "ARG" and args.startswith("TORCH_INDEX_URL=") for keyword, args in instructions)
    assert any(re.search(r"pip install .*\s\.$", call) for call in pip_calls)  # the project itself
    assert any("wget" in run for run in runs)  # KubeRay's probes run wget in Ray containers

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    last_user = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in instructions[last_user:]), "RUN after USER needs root"
    (entrypoint,) = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["marn"]
    copied = {args.split()[0] for keyword, args in instructions if keyword == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= copied  # every shipped package is in the image


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".marn", "data", ".git"} <= ignored
    copied = {args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "COPY"}
    assert not copied & ignored, "the Dockerfile copies something .dockerignore drops"


def test_image_tag_matches_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert project_image().endswith(f":{version}")
