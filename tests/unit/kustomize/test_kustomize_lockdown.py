"""The cluster locked down: plain `kubectl apply -k` (load restrictor on, one source for the config),
default-deny NetworkPolicies with exactly the allowed flows, Ray token auth on every Ray cluster, Redis
with a password from a Secret, no feature server, read-only root filesystems.

The NetworkPolicies are checked by evaluating them: a small model of the NetworkPolicy rules (a flow needs
an allow on the source's egress side and the destination's ingress side, wherever a policy selects the pod)
is asked about each flow the system needs and about flows it must refuse.
"""

from __future__ import annotations

import functools
import ipaddress
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kustomize_helpers import (
    CLUSTER_CONFIG,
    KUBECTL,
    KUSTOMIZE,
    NAMESPACE,
    ROOT,
    TARGETS,
    containers,
    load_yaml_config,
    needs_kubectl,
    pod_templates,
    ray_cluster_specs,
    render,
    serve_config,
    source_docs,
    the,
)

RAY_AUTH_SECRET = "marn-ray-auth"  # key auth_token: KubeRay's authOptions.secretName format
REDIS_SECRET = "marn-redis"  # key password
PROJECT_IMAGE_HOME = "/home/marn"  # the image's user (Dockerfile useradd marn)

# ------------------------------------------------------------------------------------- load restrictor


def kustomizations() -> list[Path]:
    return sorted(KUSTOMIZE.rglob("kustomization.yaml"))


def referenced_files(kustomization: Path) -> list[tuple[str, Path]]:
    """(field, path) for every file a kustomization loads; resource directories (other kustomizations,
    which kustomize loads with their own root) are left out, as the load restrictor leaves them out."""
    root, doc = kustomization.parent, yaml.safe_load(kustomization.read_text())
    found: list[tuple[str, str]] = []
    for entry in doc.get("resources", []) + doc.get("components", []):
        if not (root / entry).is_dir():
            found.append(("resources", entry))
    for patch in doc.get("patches", []):
        if "path" in patch:
            found.append(("patches", patch["path"]))
    found += [("patchesStrategicMerge", p) for p in doc.get("patchesStrategicMerge", [])]
    for generator in doc.get("configMapGenerator", []) + doc.get("secretGenerator", []):
        found += [("generator files", f.partition("=")[2] or f) for f in generator.get("files", [])]
        found += [("generator envs", e) for e in generator.get("envs", [])]
    return [(name, root / path) for name, path in found]


def restrictor_violations(kustomization: Path) -> list[str]:
    """kustomize's LoadRestrictionsRootOnly: a loaded file must lie inside the kustomization's folder
    after symlinks are resolved (a symlink pointing out is refused too)."""
    root = kustomization.parent.resolve()
    return [
        f"{kustomization}: {name} {path}"
        for name, path in referenced_files(kustomization)
        if not path.resolve().is_relative_to(root)
    ]


def test_every_kustomization_loads_only_files_inside_its_root() -> None:
    """The offline form of plain `kubectl apply -k` (runs without kubectl too)."""
    assert len(kustomizations()) == 4
    for kustomization in kustomizations():
        assert referenced_files(kustomization), kustomization
        assert restrictor_violations(kustomization) == []


def test_the_restrictor_check_catches_a_file_from_outside(tmp_path: Path) -> None:
    (tmp_path / "outside.yaml").write_text("a: 1\n")
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    kustomization = tmp_path / "inside" / "kustomization.yaml"
    for reference in ("../outside.yaml", "link.yaml"):
        kustomization.write_text(
            yaml.safe_dump({"configMapGenerator": [{"name": "c", "files": [f"c.yaml={reference}"]}]})
        )
        assert len(restrictor_violations(kustomization)) == 1, reference


@needs_kubectl
def test_kubectl_enforces_the_restrictor_that_every_target_passes(tmp_path: Path) -> None:
    """`render` runs plain `kubectl kustomize` (every target renders in the other tests); here, that the
    same command refuses a file outside the root, so passing means something."""
    (tmp_path / "outside.yaml").write_text("a: 1\n")
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "kustomization.yaml").write_text(
        yaml.safe_dump({"configMapGenerator": [{"name": "c", "files": ["c.yaml=../outside.yaml"]}]})
    )
    done = subprocess.run(
        [KUBECTL, "kustomize", str(tmp_path / "inside")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "security" in done.stderr + done.stdout


def test_the_cluster_config_has_one_source_inside_the_tree() -> None:
    assert CLUSTER_CONFIG.is_file() and not CLUSTER_CONFIG.is_symlink()
    assert not (ROOT / "configs" / "cluster.yaml").exists(), "a second copy would drift"
    readme = (ROOT / "README.md").read_text() + (KUSTOMIZE / "README.md").read_text()
    assert "configs/cluster.yaml" not in readme and "LoadRestrictionsNone" not in readme


# ------------------------------------------------------------------------------------- NetworkPolicies


@dataclass(frozen=True)
class Endpoint:
    name: str
    namespace: str | None  # None: outside every namespace (the API server, the internet), by IP
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = "10.0.0.9"


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector ({} selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def peer_matches(peer: dict[str, Any], other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(c) for c in block.get("except", [])
        )
    if other.namespace is None:
        return False
    namespace_labels = {"kubernetes.io/metadata.name": other.namespace}
    if "namespaceSelector" in peer:
        namespace_ok = selects(peer["namespaceSelector"], namespace_labels)
    else:
        namespace_ok = other.namespace == policy_namespace
    return namespace_ok and selects(peer.get("podSelector"), other.labels)


def ports_match(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        start = entry.get("port")
        if start is None or start == port or start <= port <= entry.get("endPort", start):
            return True
    return False


def side_allows(policies, pod: Endpoint, other: Endpoint, port: int, protocol: str, direction: str) -> bool:
    """One side of a flow: a pod no policy isolates in this direction allows it; an isolated one needs a
    rule of some selecting policy that admits the peer and the port."""
    applicable = [
        p
        for p in policies
        if pod.namespace == p["metadata"]["namespace"]
        and selects(p["spec"]["podSelector"], pod.labels)
        and direction in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applicable:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in applicable:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            peer_ok = not peers or any(peer_matches(p, other, policy["metadata"]["namespace"]) for p in peers)
            if peer_ok and ports_match(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(policies, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    return side_allows(policies, source, destination, port, protocol, "Egress") and side_allows(
        policies, destination, source, port, protocol, "Ingress"
    )


def pod_labels(docs: list[dict[str, Any]], where_prefix: str) -> dict[str, str]:
    """The labels of the pods a manifest creates (KubeRay and Kubernetes copy the template's labels)."""
    for doc in docs:
        for where, template in pod_templates(doc):
            if where.startswith(where_prefix):
                return dict(template["metadata"]["labels"])
    raise AssertionError(f"no pod template {where_prefix}")


def endpoints(docs: list[dict[str, Any]]) -> dict[str, Endpoint]:
    """Every party of the system, ours with the labels the manifests give them."""
    ours = {
        "ray_head": "RayCluster/marn-ray head",
        "ray_worker": "RayCluster/marn-ray cpu-workers",
        "serve_head": "RayService/marn-serve head",
        "serve_worker": "RayService/marn-serve serve-workers",
        "submitter": "RayJob/marn-train submitter",
        "redis": "StatefulSet/marn-redis",
        "schedule": "Job/marn-schedule-retraining",
    }
    found = {name: Endpoint(name, NAMESPACE, pod_labels(docs, where)) for name, where in ours.items()}
    found |= {
        # a Kubeflow Pipelines task pod (Argo) in this namespace, and a pod of ours with no role
        "kfp_task": Endpoint("kfp_task", NAMESPACE, {"workflows.argoproj.io/workflow": "marn-ctr-abc12"}),
        "stray_pod": Endpoint("stray_pod", NAMESPACE, {"app": "debug"}),
        "operator": Endpoint("operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}),
        "fake_operator": Endpoint("fake_operator", "default", {"app.kubernetes.io/name": "kuberay-operator"}),
        "dns": Endpoint("dns", "kube-system", {"k8s-app": "kube-dns"}),
        "other_kube_system": Endpoint("other_kube_system", "kube-system", {"k8s-app": "metrics-server"}),
        "kfp_api": Endpoint("kfp_api", "kubeflow", {"app": "ml-pipeline"}),
        "kfp_minio": Endpoint("kfp_minio", "kubeflow", {"app": "minio"}),
        "kfp_metadata": Endpoint("kfp_metadata", "kubeflow", {"component": "metadata-grpc-server"}),
        "kfp_mysql": Endpoint("kfp_mysql", "kubeflow", {"app": "mysql"}),
        "caller": Endpoint("caller", "ingress-nginx", {"app": "ingress"}),
        "api_server": Endpoint("api_server", None, ip="10.96.0.1"),
        "internet": Endpoint("internet", None, ip="203.0.113.7"),
    }
    return found


# (source, destination, port, protocol): what the system needs ...
NEEDED = [
    ("caller", "serve_worker", 8000, "TCP"),  # the A/B API on every proxy
    ("serve_worker", "serve_head", 6379, "TCP"),  # Ray inside one cluster: GCS
    ("serve_head", "serve_worker", 10005, "TCP"),  # ... and worker ports
    ("ray_worker", "ray_head", 6379, "TCP"),
    ("ray_head", "ray_worker", 12345, "TCP"),
    ("operator", "ray_head", 8265, "TCP"),  # KubeRay to the dashboards
    ("operator", "serve_head", 8265, "TCP"),
    ("operator", "serve_head", 52365, "TCP"),
    ("submitter", "ray_head", 8265, "TCP"),  # ray job submit
    ("serve_worker", "redis", 6379, "TCP"),  # the scorers read Feast online
    ("kfp_task", "redis", 6379, "TCP"),  # the pipeline's features and register tasks write it
    ("kfp_task", "kfp_api", 8887, "TCP"),
    ("kfp_task", "kfp_api", 8888, "TCP"),
    ("kfp_task", "kfp_metadata", 8080, "TCP"),
    ("kfp_task", "kfp_minio", 9000, "TCP"),
    ("kfp_task", "api_server", 443, "TCP"),
    ("schedule", "kfp_api", 8888, "TCP"),
    ("ray_head", "api_server", 443, "TCP"),  # the autoscaler
    ("serve_head", "api_server", 6443, "TCP"),
    *[
        (pod, "dns", 53, proto)
        for pod in ("ray_worker", "redis", "submitter", "kfp_task")
        for proto in ("UDP", "TCP")
    ],
]
# ... and what it must refuse.
REFUSED = [
    ("caller", "serve_head", 8000, "TCP"),  # the head's proxy: left out of the Serve Service (finding 7)
    ("caller", "serve_head", 8265, "TCP"),  # no dashboard, job API or Ray client from outside
    ("caller", "ray_head", 8265, "TCP"),
    ("caller", "ray_head", 10001, "TCP"),
    ("caller", "redis", 6379, "TCP"),
    ("stray_pod", "redis", 6379, "TCP"),  # namespace membership alone is no longer enough
    ("stray_pod", "ray_head", 8265, "TCP"),
    ("stray_pod", "serve_head", 6379, "TCP"),
    ("ray_worker", "redis", 6379, "TCP"),  # training does not read the online store
    ("submitter", "redis", 6379, "TCP"),
    ("schedule", "redis", 6379, "TCP"),
    ("serve_worker", "ray_head", 6379, "TCP"),  # the two Ray clusters are kept apart
    ("ray_worker", "serve_head", 8265, "TCP"),
    ("submitter", "serve_head", 8265, "TCP"),
    ("submitter", "ray_head", 6379, "TCP"),
    ("operator", "ray_worker", 8265, "TCP"),
    ("operator", "ray_head", 10001, "TCP"),
    ("fake_operator", "ray_head", 8265, "TCP"),  # the operator's label in another namespace
    ("ray_worker", "api_server", 443, "TCP"),  # only the heads' autoscalers
    ("serve_worker", "internet", 443, "TCP"),
    ("redis", "internet", 443, "TCP"),
    ("schedule", "kfp_minio", 9000, "TCP"),
    ("schedule", "internet", 443, "TCP"),
    ("ray_worker", "other_kube_system", 53, "UDP"),
    ("redis", "serve_worker", 8000, "TCP"),
    ("caller", "schedule", 8080, "TCP"),  # pods with no ingress rule of their own: the default deny
    ("caller", "submitter", 8265, "TCP"),
    ("kfp_task", "submitter", 443, "TCP"),
    ("kfp_task", "kfp_mysql", 3306, "TCP"),  # Kubeflow's database: only its services' ports (finding 10)
    ("kfp_task", "kfp_minio", 9001, "TCP"),  # ... not the object store's console
]


def network_policies(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


@functools.cache
def policies_and_parties(target: str) -> tuple[list[dict[str, Any]], dict[str, Endpoint]]:
    """Parsed once per target for the flow table (read only)."""
    docs = render(target)
    return network_policies(docs), endpoints(docs)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_the_namespace_denies_everything_by_default(target: str) -> None:
    policies = network_policies(render(target))
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("ingress")
        for p in deny
        if not p["spec"].get("egress")
    ), "no default-deny policy (empty podSelector, Ingress and Egress, no rules)"
    for policy in policies:
        assert policy["metadata"]["namespace"] == NAMESPACE
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                assert "ipBlock" not in peer, f"{policy['metadata']['name']}: address ranges are not pinned"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("source", "destination", "port", "protocol", "expected"),
    [(*flow, True) for flow in NEEDED] + [(*flow, False) for flow in REFUSED],
)
def test_each_needed_flow_is_allowed_and_each_other_refused(
    target: str, source: str, destination: str, port: int, protocol: str, expected: bool
) -> None:
    policies, parties = policies_and_parties(target)
    assert allowed(policies, parties[source], parties[destination], port, protocol) is expected


def test_the_policy_model_follows_kubernetes_semantics() -> None:
    """The evaluator above on hand-made policies: isolation only where a policy selects, both sides
    needed, namespace vs pod selectors, ports and protocols."""
    a = Endpoint("a", "ns", {"app": "a"})
    b = Endpoint("b", "ns", {"app": "b"})
    elsewhere = Endpoint("c", "other", {"app": "a"})

    def policy(selector, types, **rules):
        return {
            "metadata": {"namespace": "ns"},
            "spec": {"podSelector": selector, "policyTypes": types, **rules},
        }

    assert allowed([], a, b, 80)  # nothing selects: open
    deny = policy({}, ["Ingress", "Egress"])
    assert not allowed([deny], a, b, 80)
    ingress_b = policy({"matchLabels": {"app": "b"}}, ["Ingress"], ingress=[{"from": [{"podSelector": {}}]}])
    egress_a = policy({"matchLabels": {"app": "a"}}, ["Egress"], egress=[{"ports": [{"port": 80}]}])
    assert not allowed([deny, ingress_b], a, b, 80)  # egress side still closed
    assert allowed([deny, ingress_b, egress_a], a, b, 80)
    assert not allowed([deny, ingress_b, egress_a], a, b, 81)
    assert not allowed([deny, ingress_b, egress_a], a, b, 80, "UDP")
    assert not side_allows([ingress_b], b, elsewhere, 80, "TCP", "Ingress")  # podSelector alone: same ns
    across = policy(
        {"matchLabels": {"app": "b"}},
        ["Ingress"],
        ingress=[
            {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}}]}
        ],
    )
    assert side_allows([across], b, elsewhere, 80, "TCP", "Ingress")
    assert not side_allows([across], b, a, 80, "TCP", "Ingress")
    assert selects({"matchExpressions": [{"key": "x", "operator": "Exists"}]}, {"x": ""})
    assert not selects({"matchExpressions": [{"key": "x", "operator": "In", "values": ["1"]}]}, {"x": "2"})


# -------------------------------------------------------------------------------------- Ray token auth


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_ref(variable: dict[str, Any]) -> tuple[str, str] | None:
    ref = variable.get("valueFrom", {}).get("secretKeyRef")
    return None if ref is None else (ref["name"], ref["key"])


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_ray_cluster_requires_the_token_from_the_secret(target: str) -> None:
    clusters = [(d["kind"], c) for d in render(target) for c in ray_cluster_specs(d)]
    assert {kind for kind, _ in clusters} == {"RayCluster", "RayService"}
    for kind, cluster in clusters:
        assert cluster.get("authOptions") == {"mode": "token", "secretName": RAY_AUTH_SECRET}, kind


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_ray_job_submitters_send_the_token_and_nothing_turns_auth_off(target: str) -> None:
    submitters = 0
    for doc in render(target):
        for where, container in containers(doc):
            env = env_of(container)
            assert env.get("RAY_AUTH_MODE", {}).get("value") in (None, "token"), where
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), f"{where}: a token written in the manifest"
            if where.endswith("submitter ray-job-submitter"):
                submitters += 1
                assert env["RAY_AUTH_MODE"]["value"] == "token", where
                assert secret_ref(env["RAY_AUTH_TOKEN"]) == (RAY_AUTH_SECRET, "auth_token"), where
    assert submitters == 2


def test_the_base_ships_no_secret_values() -> None:
    """Both Secrets are created by hand (kustomize/README.md): a committed one would be public."""
    assert not [d for d in source_docs() if d["kind"] == "Secret"]
    for path in KUSTOMIZE.rglob("kustomization.yaml"):
        assert "secretGenerator" not in yaml.safe_load(path.read_text()), path


# ------------------------------------------------------------------------------------------------ Redis


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_redis_has_a_read_write_and_a_read_only_user_from_the_secret_and_no_default_user(target: str) -> None:
    """Review finding 9: one full-rights password, held by the internet-facing serving pods too, let a
    compromised scorer rewrite every feature or FLUSHALL. tests/integration/test_redis_online.py runs this
    script against a real redis-server and checks what each user may do."""
    from marn.features.repo import REDIS_PASSWORD_ENV, REDIS_USER_ENV

    docs = render(target)
    (redis,) = [c for _, c in containers(the(docs, "StatefulSet", "marn-redis"))]
    script = " ".join(redis.get("command", []) + redis.get("args", []))
    assert "redis-server -" in script and "requirepass" not in script  # the ACL, passwords included, on stdin
    assert "user default off" in script
    assert "+@all -@dangerous" in script and "+@read +@connection -@dangerous" in script
    assert "--protected-mode yes" in script and "protected-mode no" not in script
    keys = {"PIPELINE_USER": "pipeline-user", "PIPELINE_PASSWORD": "pipeline-password"}
    keys |= {"SERVING_USER": "serving-user", "SERVING_PASSWORD": "serving-password"}
    for variable, key in keys.items():
        assert secret_ref(env_of(redis)[f"REDIS_{variable}"]) == (REDIS_SECRET, key)
        assert f"${{REDIS_{variable}:?}}" in script  # a missing key stops the start, never an empty password
    probe = " ".join(redis["readinessProbe"]["exec"]["command"])
    assert "REDISCLI_AUTH" in probe and '--user "$REDIS_SERVING_USER"' in probe  # probes authenticate

    serving = [(w, c) for d in docs if d["kind"] == "RayService" for w, c in containers(d)]
    assert len(serving) == 3
    for where, container in serving:  # the scorers: the read-only user, from the Secret, read at run time
        if where.endswith(" head ray-head"):  # hosts no replica (num-cpus 0): needs no password
            assert REDIS_PASSWORD_ENV not in env_of(container), where
            continue
        assert secret_ref(env_of(container)[REDIS_USER_ENV]) == (REDIS_SECRET, "serving-user"), where
        assert secret_ref(env_of(container)[REDIS_PASSWORD_ENV]) == (REDIS_SECRET, "serving-password"), where


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_no_config_map_or_command_carries_a_password(target: str) -> None:
    docs = render(target)
    for config_map in (d for d in docs if d["kind"] == "ConfigMap"):
        config = load_yaml_config(config_map["data"]["config.yaml"])
        assert "password" not in config.feast.redis_connection
        assert "password" not in config_map["data"]["config.yaml"].lower()
    for doc in docs:
        for where, container in containers(doc):
            for variable in container.get("env", []):
                if any(word in variable["name"].upper() for word in ("PASSWORD", "TOKEN", "SECRET")):
                    assert "value" not in variable, f"{where}: {variable['name']} written in the manifest"


def test_the_pipeline_tasks_reach_redis_as_its_read_write_user(tmp_path) -> None:
    from marn.config import dump_config, load_config
    from marn.features.repo import REDIS_PASSWORD_ENV, REDIS_USER_ENV
    from pipelines import marn_pipeline

    assert marn_pipeline.REDIS_SECRET == REDIS_SECRET
    out = marn_pipeline.compile_pipeline(tmp_path / "p.yaml", dump_config(load_config(CLUSTER_CONFIG)))
    platform = list(yaml.safe_load_all(out.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]
    feast_tasks = {"exec-features", "exec-register", "exec-register-2"}
    for name in feast_tasks:
        (secret,) = platform["executors"][name]["secretAsEnv"]
        assert (
            secret["secretName"] == REDIS_SECRET and secret["optional"] is True
        )  # the local runner has none
        assert {k["secretKey"]: k["envVar"] for k in secret["keyToEnv"]} == {
            "pipeline-user": REDIS_USER_ENV,
            "pipeline-password": REDIS_PASSWORD_ENV,
        }
    assert "password" not in load_yaml_config(CLUSTER_CONFIG.read_text()).feast.redis_connection


# ---------------------------------------------------------------------------------- pods and filesystems


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_no_feature_server(target: str) -> None:
    """Serving reads Feast in-process; an unauthenticated feature server exposed every user's history."""
    docs = render(target)
    assert not [
        d for d in docs if d["kind"] in ("Deployment", "Service") and "feature" in d["metadata"]["name"]
    ]
    for doc in docs:
        for where, container in containers(doc):
            assert container.get("command", [])[:1] != ["feast"], where


def mounts(template: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes.get(m["name"], {}) for m in container.get("volumeMounts", [])}


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_a_read_only_root_and_an_emptydir_tmp(target: str) -> None:
    checked = 0
    for doc in render(target):
        for where, template in pod_templates(doc):
            for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                name = f"{where} {container['name']}"
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
                mounted = mounts(template, container)
                assert "emptyDir" in mounted.get("/tmp", {}), (
                    f"{name}: no emptyDir /tmp (Ray writes /tmp/ray)"
                )
                if not container["image"].startswith("redis:"):  # Python's and Ray's files under $HOME
                    assert "emptyDir" in mounted.get(PROJECT_IMAGE_HOME, {}), f"{name}: no emptyDir $HOME"
                checked += 1
        for cluster in ray_cluster_specs(doc):  # the autoscaler container KubeRay adds beside the head
            options = cluster.get("autoscalerOptions")
            if options is not None:
                assert options["securityContext"]["readOnlyRootFilesystem"] is True
                head = cluster["headGroupSpec"]["template"]
                volumes = {v["name"]: v for v in head["spec"]["volumes"]}
                tmp = [m for m in options["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]]
    assert checked >= 8


@needs_kubectl
def test_every_network_policy_is_there_for_a_flow() -> None:
    """Each policy, removed, changes the answer for some flow above: none is dead weight, and the flow
    tables cover every rule (the default deny by a refused flow, each allow by a needed one)."""
    docs = render("base")
    parties, policies = endpoints(docs), network_policies(docs)
    assert len(policies) >= 10
    for policy in policies:
        rest = [p for p in policies if p is not policy]
        changed = [
            (s, d, port)
            for s, d, port, protocol in NEEDED + REFUSED
            if allowed(rest, parties[s], parties[d], port, protocol)
            != allowed(policies, parties[s], parties[d], port, protocol)
        ]
        assert changed, f"removing NetworkPolicy {policy['metadata']['name']} changes no flow"


SERVE_SECRET = "marn-serve"  # key request-id-secret: signs /predict's request ids (serve/tokens.py)


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_every_serving_worker_reads_the_signing_key_and_the_callers_from_the_secret(target: str) -> None:
    """Every RayService worker can host a router replica, so each reads the one signing key and the callers
    list from the Secret (the variables marn reads: serve.secret_env, serve.callers_env); the head, which
    hosts none (num-cpus 0) but runs the public proxy, holds neither (review finding 7); no manifest writes
    either in."""
    from marn.config import load_config

    variable = load_config(str(CLUSTER_CONFIG)).serve.secret_env
    service = the(render(target), "RayService")
    pods = list(containers(service))
    assert len(pods) == 3  # head, serve workers, the ledger worker
    callers = load_config(str(CLUSTER_CONFIG)).serve.callers_env
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert service["spec"]["excludeHeadPodFromServeSvc"] is True  # callers never reach the head's proxy
    for where, container in pods:
        if where.endswith(" head ray-head"):
            assert not set(env_of(container)) & {variable, callers}, where
            continue
        assert secret_ref(env_of(container)[variable]) == (SERVE_SECRET, "request-id-secret"), where
        assert secret_ref(env_of(container)[callers]) == (SERVE_SECRET, "callers"), where
    for doc in render(target):
        for where, container in containers(doc):
            for name in (variable, callers):
                assert "value" not in env_of(container).get(name, {}), f"{where}: {name} in a manifest"


@needs_kubectl
@pytest.mark.parametrize("target", TARGETS)
def test_the_ledger_writes_to_its_own_volume_in_one_pinned_pod(target: str) -> None:
    """The ledger's SQLite file (serve.ledger_path) lies on a read-write claim mounted by exactly one pod
    group of one pod, and the ab_ledger deployment is pinned there by a custom resource only that group
    offers; every other serving mount of data is read-only."""
    from marn.config import load_config

    ledger_path = load_config(str(CLUSTER_CONFIG)).serve.ledger_path
    assert ledger_path is not None
    docs = render(target)
    service = the(docs, "RayService")
    (cluster,) = ray_cluster_specs(service)
    writable = []
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"] for v in spec["volumes"] if "persistentVolumeClaim" in v
        }
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] in claims and not (
                    mount.get("readOnly") or claims[mount["name"]].get("readOnly")
                ):
                    writable.append((group, mount, claims[mount["name"]]["claimName"]))
    ((group, mount, claim),) = writable  # one writable claim in all of serving
    assert ledger_path.is_relative_to(mount["mountPath"])
    assert the(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert group.get("minReplicas") == group.get("maxReplicas") == 1 and group.get("replicas", 1) == 1
    offered = yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))
    (app,) = serve_config(service)["applications"]
    ledger = next(d for d in app["deployments"] if d["name"] == "ab_ledger")
    assert ledger["num_replicas"] == 1
    (pin,) = ledger["ray_actor_options"]["resources"]
    assert offered == {pin: 1}
    others = [g for g in cluster["workerGroupSpecs"] if g is not group]
    assert all(pin not in g.get("rayStartParams", {}).get("resources", "") for g in others)
    # An upgrade's second RayCluster puts its ledger pod on the running one's node (review finding 8): a
    # required affinity to its own label, per node, so the ReadWriteOnce claim can attach to both.
    labels = group["template"]["metadata"]["labels"]
    (term,) = group["template"]["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    selector = term["labelSelector"]["matchLabels"]
    assert selector and all(
        labels.get(k) == v for k, v in selector.items()
    )  # matches itself: the first schedules
    for other in [cluster["headGroupSpec"], *others]:  # ... and no other pod
        assert not all(other["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
