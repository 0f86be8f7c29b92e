"""The KFP pipeline compiles to IR YAML holding every stage and the cluster settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components import STAGES
from marn.config import dump_config, load_config, parse_config
from pipelines.marn_pipeline import DATA_PVC, REDIS_SECRET, compile_pipeline
from pipelines.schedule import check_cron

REPO = Path(__file__).resolve().parents[2]


def _compiled(tmp_path: Path) -> dict:
    cfg = load_config(REPO / "configs" / "local.yaml", {"tune": {"trials": 3}})
    out = compile_pipeline(tmp_path / "pipeline.yaml", dump_config(cfg))
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], out.read_text(), cfg


def test_every_stage_is_a_component(tmp_path):
    ir, _, _ = _compiled(tmp_path)
    executors = {name.removesuffix("-2") for name in ir["deploymentSpec"]["executors"]}  # baseline copies
    assert executors == {f"exec-{stage}" for stage in STAGES}
    tasks = {task["taskInfo"]["name"] for task in ir["root"]["dag"]["tasks"].values()}
    assert {"validate", "embed", "features", "tune", "deploy"} <= tasks
    assert {"train-candidate", "train-baseline", "register-candidate", "register-baseline"} <= tasks


def test_tune_train_and_register_read_the_courier_tasks_dataset(tmp_path):
    """The courier task sits between features and tune/train (it trains only with embed.method courier),
    so every stage that reads the data directory starts after it."""
    ir, _, _ = _compiled(tmp_path)
    tasks = ir["root"]["dag"]["tasks"]
    assert tasks["courier"]["dependentTasks"] == ["embed", "features"]
    for name, task in tasks.items():
        dataset = task["inputs"].get("artifacts", {}).get("dataset")
        if name.startswith(("tune", "train", "register")):
            assert dataset["taskOutputArtifact"] == {
                "outputArtifactKey": "pretrained",
                "producerTask": "courier",
            }


def test_components_call_marn_and_run_in_the_project_image(tmp_path):
    ir, _, _ = _compiled(tmp_path)
    for stage in STAGES:
        container = ir["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
        assert container["image"].startswith("ghcr.io/marn-project/marn:")
        source = "\n".join(container["command"] + container.get("args", []))
        assert f"from marn.stages import run_{stage}" in source
        assert "pip install" not in source  # the image has marn; no per-task installs


def test_cluster_settings_compile_into_the_platform_spec(tmp_path):
    _, text, _ = _compiled(tmp_path)
    docs = list(yaml.safe_load_all(text))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-embed"]["nodeSelector"]["labels"] == {"marn.io/pool": "gpu"}
    assert platform["exec-embed"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert all(p["pvcMount"][0]["constant"] == DATA_PVC for p in platform.values())
    assert platform["exec-features"]["secretAsEnv"][0]["secretName"] == REDIS_SECRET
    embed = docs[0]["deploymentSpec"]["executors"]["exec-embed"]["container"]["resources"]
    assert embed["accelerator"]["resourceCount"] == "1"


def test_the_config_parameter_defaults_to_the_compiled_config(tmp_path):
    ir, _, cfg = _compiled(tmp_path)
    default = ir["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert parse_config(default) == cfg


def test_recurring_runs_take_kubeflow_six_field_cron():
    assert check_cron("0 0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(ValueError, match="6 fields"):
        check_cron("0 3 * * *")  # a 5-field Unix cron is a common mistake


def test_schedule_authenticates_with_the_mounted_kfp_token_only_when_there_is_one(tmp_path):
    from kfp.client import ServiceAccountTokenVolumeCredentials

    from pipelines.schedule import _pod_credentials

    assert _pod_credentials(tmp_path / "absent") is None
    token = tmp_path / "token"
    token.write_text("a-projected-service-account-token")
    assert isinstance(_pod_credentials(token), ServiceAccountTokenVolumeCredentials)
