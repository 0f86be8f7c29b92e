"""Shared helpers of the offline checks of the cluster deployment (tests/unit/kustomize/test_*.py):
rendering kustomize/ (base, overlays dev/prod/canary), walking pod templates and containers, the KubeRay
schemas, and parsing the `marn` commands the manifests run.

Rendering needs `kubectl` (kustomize v5 inside) and runs it exactly as a user would, load restrictor on;
those tests skip without it. Core kinds are validated strictly against Kubernetes K8S_VERSION's schemas
(kubernetes-validate, offline); KubeRay kinds against the JSON schemas in tests/unit/schemas/kuberay, and
every pod template inside them strictly as a core PodTemplate.
"""

from __future__ import annotations

import functools
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

ROOT = Path(__file__).resolve().parents[3]
KUSTOMIZE = ROOT / "kustomize"
CLUSTER_CONFIG = KUSTOMIZE / "base" / "config" / "cluster.yaml"  # the one source: ConfigMap and `--config`
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas" / "kuberay"

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
    """Plain `kubectl kustomize` (what `kubectl apply -k` runs), load restrictor on."""
    done = subprocess.run(
        [KUBECTL, "kustomize", str(KUSTOMIZE / target)],
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
    import cli.main  # the console script's app: marn's commands and the adapters' groups

    argv = shlex.split(line) if isinstance(line, str) else list(line)
    if not argv or argv[0] != "marn":
        raise ValueError(f"not a marn command: {argv!r}")
    command, name, parent, args, path = typer.main.get_command(cli.main.app), "marn", None, argv[1:], []
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
