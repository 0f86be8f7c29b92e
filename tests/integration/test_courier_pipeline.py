"""The local pipeline with embed.method courier: COURIER trains between features and tune/train, and the
registered model was trained on its vectors (issue 19 item 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from marn.config import SynthConfig
from marn.data.synth import synthesize

pytestmark = pytest.mark.slow

MARN = Path(sys.executable).with_name("marn")
BOUND_S = 900  # the whole pipeline on the tiny world, well above its few minutes


def test_the_courier_switch_runs_the_stage_and_the_models_read_its_vectors(tmp_path, tiny_settings):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(users=60, items=50, image_size=16))
    settings = tiny_settings(tmp_path / "work")
    settings.update(
        embed={
            "image_size": 64,
            "method": "courier",
            "courier": {"dim": 16, "hidden": 32, "epochs": 2, "negatives": 16, "min_history": 2},
        },
        pipeline={"tune": False},
        distributed={"workers": 1},
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "COLUMNS": "200"}

    started = time.monotonic()
    result = subprocess.run(
        [str(MARN), "pipeline", "run", "--local", "--data", str(data), "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=BOUND_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - started < BOUND_S

    run = next((tmp_path / "work" / "kfp").glob("marn-ctr-*"))
    order = sorted(run.glob("*/executor_output.json"), key=lambda p: p.stat().st_mtime)
    names = [p.parent.name for p in order]
    assert names.index("features") < names.index("courier") < names.index("tune") < names.index("train")
    table = pq.read_table(data / "courier_embeddings.parquet")
    images = pq.read_table(data / "image_embeddings.parquet")
    assert table.num_rows == images.num_rows  # every item with a poster
    metrics = json.loads((data / "courier_metrics.json").read_text())
    assert metrics["settings"]["dim"] == 16 and 1 <= metrics["best_epoch"] <= 2
    assert 0.0 <= metrics["recall_at_k"]["courier"] <= 1.0

    version = json.loads((tmp_path / "work" / "registry" / "marn" / "champion.json").read_text())["version"]
    saved = torch.load(
        tmp_path / "work" / "registry" / "marn" / version / "model.pt", map_location="cpu", weights_only=True
    )
    assert saved["features"]["image_source"] == "courier"
    assert saved["features"]["image"].shape[1] == 16  # COURIER's width, not the backbone's 1280
