"""The Serve config `marn serve up` deploys: Ray Serve's own schema, and the same app the RayService runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from marn.config import load_config
from serve.control import APP_NAME, IMPORT_PATH, serve_config

ROOT = Path(__file__).resolve().parents[2]


def test_local_document_passes_ray_serves_schema_and_carries_the_weights():
    from ray.serve.schema import ServeDeploySchema

    cfg = load_config(ROOT / "configs" / "local.yaml", {"serve": {"weights": {"marn": 0.05, "dupn": 0.95}}})
    document = serve_config(cfg, "configs/local.yaml")
    ServeDeploySchema.model_validate(document)  # raises on a wrong field
    [app] = document["applications"]
    assert app["import_path"] == IMPORT_PATH and Path(app["args"]["config"]).is_absolute()
    router = next(d for d in app["deployments"] if d["name"] == "router")
    assert router["user_config"] == {"weights": {"marn": 0.05, "dupn": 0.95}, "shadow": False}
    assert document["http_options"] == {"host": "127.0.0.1", "port": 8000}


def test_local_and_cluster_documents_name_the_same_app_and_deployments():
    rayservice = yaml.safe_load((ROOT / "kustomize" / "base" / "rayservice.yaml").read_text())
    [cluster_app] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    [local_app] = serve_config(load_config(ROOT / "configs" / "local.yaml"), None)["applications"]
    assert cluster_app["name"] == local_app["name"] == APP_NAME
    assert cluster_app["import_path"] == local_app["import_path"]
    local_names = {d["name"] for d in local_app["deployments"]}
    assert local_names <= {d["name"] for d in cluster_app["deployments"]}
    cluster_router = next(d for d in cluster_app["deployments"] if d["name"] == "router")
    assert set(cluster_router["user_config"]) == {"weights", "shadow"}
