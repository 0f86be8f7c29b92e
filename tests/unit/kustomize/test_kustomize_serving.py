"""Serving and overlays: serveConfigV2 against Ray Serve's schema, the `marn` commands, what each overlay
changes."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
from kustomize_helpers import (
    CLUSTER_CONFIG,
    GPU,
    SERVE_DEPLOYMENTS,
    TARGETS,
    containers,
    load_yaml_config,
    marn_commands,
    needs_kubectl,
    parse_marn_command,
    ray_cluster_specs,
    render,
    router_user_config,
    serve_config,
    source_serve_configs,
    the,
)

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
    cluster = load_yaml_config(CLUSTER_CONFIG.read_text())
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
    cfg = load_yaml_config(CLUSTER_CONFIG.read_text())
    assert cfg.distributed.use_gpu and gpu["maxReplicas"] >= cfg.distributed.workers  # a GPU per worker
    assert gpu["maxReplicas"] >= cfg.embed.actors
    assert groups["cpu-workers"]["minReplicas"] >= 2
    assert serving["workerGroupSpecs"][0]["minReplicas"] >= 2
    for deployment in serve_config(the(docs, "RayService"))["applications"][0]["deployments"]:
        if deployment["name"] != "ab_ledger":  # the ledger is one replica by design
            assert deployment["autoscaling_config"]["min_replicas"] >= 2, deployment["name"]
