"""The KFP pipeline run end to end by the KFP local runner (``marn pipeline run --local``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from marn.config import SynthConfig
from marn.data.synth import synthesize

pytestmark = pytest.mark.slow

MARN = Path(sys.executable).with_name("marn")


def marn(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "COLUMNS": "200"}
    return subprocess.run([str(MARN), *args], capture_output=True, text=True, env=env, timeout=900)


def _config(tmp_path: Path, extra: dict | None = None) -> Path:
    cfg = {"paths": {"work_dir": str(tmp_path / "work")}, **(extra or {})}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_poisoned_data_stops_the_pipeline_at_validation_with_the_report(tmp_path):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(users=30, items=40, image_size=8))
    events = pd.read_parquet(data / "events.parquet")
    events.loc[events.index[:3], "user_id"] = None
    events.loc[events.index[3:5], "ts"] = pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=30)
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), data / "events.parquet")

    result = marn("pipeline", "run", "--local", "--data", str(data), "--config", str(_config(tmp_path)))

    assert result.returncode == 1, result.stdout + result.stderr
    runs = list((tmp_path / "work" / "kfp").glob("marn-ctr-*"))
    assert len(runs) == 1
    report = runs[0] / "validate" / "report"
    assert report.exists(), "the validation report is kept as the failed task's artifact"
    html = report.read_text()
    assert "FAILED" in html
    assert "expect_column_values_to_not_be_null" in html and "user_id" in html  # the null users
    assert "expect_column_values_to_be_between" in html  # the future timestamps
    assert sorted(p.name for p in runs[0].iterdir() if p.is_dir()) == ["validate"], "no stage after validate"
    assert "DataValidationError" in (runs[0] / "pipeline.log").read_text()
    assert str(report) in result.stderr.replace("\n", "")
    assert not (tmp_path / "work" / "registry").exists()


def test_demo_runs_every_stage_registers_both_arms_and_skips_unchanged_data(tmp_path, tiny_settings):
    tiny = tiny_settings(tmp_path / "work")
    tiny.update(
        embed={"image_size": 64},
        tune={"trials": 2, "max_epochs": 1, "grace_epochs": 1, "cpus_per_trial": 1},
        distributed={"workers": 2},
    )
    config = _config(tmp_path, tiny)
    work = tmp_path / "work"

    try:
        result = marn("demo", "--config", str(config))
    finally:
        marn("serve", "down", "--config", str(config))  # the demo leaves the service up

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the A/B service answered" in result.stdout and '-> 200 {"arm":' in result.stdout
    for stage in ("validate", "embed", "features", "tune", "train marn", "train dupn", "deploy"):
        assert stage in result.stdout, f"no time printed for {stage}"
    run = next((work / "kfp").glob("marn-ctr-*"))
    finished = {p.parent.name for p in run.glob("*/executor_output.json")}
    assert finished == {
        "validate",
        "embed",
        "features",
        "courier",  # with embed.method imagenet (the default) it passes the dataset on
        "tune",
        "train",
        "evaluate",
        "register",
        "train-2",
        "evaluate-2",
        "register-2",
        "deploy",
    }
    data = work / "demo" / "data"
    assert (data / "image_embeddings.parquet").exists()  # the embed stage's vectors
    assert (run / "features" / "samples" / "train.parquet").exists()  # samples from Feast
    best = json.loads((run / "tune" / "executor_output.json").read_text())["parameterValues"]["Output"]
    assert 0.01 <= best["lambda0"] <= 1.8
    for model in ("marn", "dupn"):
        assert (work / "registry" / model / "v0001" / "card.json").exists()
        card = json.loads((work / "registry" / model / "v0001" / "card.json").read_text())
        assert 0.0 < card["metrics"]["auc"] < 1.0
    marn_metrics = json.loads((work / "registry" / "marn" / "v0001" / "metrics.json").read_text())
    assert marn_metrics["workers"] == 2  # Ray Train ran the fit loop in two workers
    plan = yaml.safe_load((run / "deploy" / "deployment" / "serve_config.yaml").read_text())
    assert set(plan["arms"]) == {"marn", "dupn"}
    assert (work / "feast" / "data" / "item_representations_marn_v0001.parquet").exists()  # paper 4.9.2

    again = marn("pipeline", "run", "--local", "--data", str(data), "--if-new-data", "--config", str(config))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert len(list((work / "kfp").glob("marn-ctr-*"))) == 1
