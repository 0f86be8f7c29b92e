"""The command contract of docs/design.md, run as a user would: the installed ``marn`` script in a
subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

MARN = Path(sys.executable).with_name("marn")


def marn(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}
    result = subprocess.run([str(MARN), *args], capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(
            f"marn {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def test_models_lists_names_one_a_line():
    from marn.models import model_names

    assert marn("models", "--names").stdout.splitlines() == model_names()
    table = marn("models").stdout
    assert all(f" {name} " in table for name in model_names())


def test_train_marn_writes_metrics_and_a_checkpoint_that_reloads(tmp_path):
    from marn.models.marn import MARN
    from marn.train import load_trained

    data, run = tmp_path / "data", tmp_path / "run"
    marn("data", "synth", "--out", str(data), "--users", "200", "--items", "100", "--seed", "5")
    marn("train", "--model", "marn", "--data", str(data), "--out", str(run), "--epochs", "1", "--seed", "2")
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"auc", "user_auc", "logloss", "auc_by_popularity", "unseen_recall"} <= set(metrics)
    assert {"adv", "d0", "ds"} <= set(metrics["history"][0])  # the adversarial losses are logged
    trained = load_trained(run / "model.pt")
    model, config = trained.model, trained.config
    assert isinstance(model, MARN) and config["train"]["model"] == "marn"


def test_synth_validate_train_on_the_embedded_default(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    marn("data", "synth", "--out", str(data), "--users", "300", "--items", "150", "--seed", "3")
    assert (data / "events.parquet").exists() and any((data / "images").glob("*.png"))
    assert marn("validate", "--data", str(data), "--report", str(tmp_path / "v.html")).returncode == 0
    assert "<html" in (tmp_path / "v.html").read_text().lower()
    marn("train", "--model", "lr", "--data", str(data), "--out", str(run), "--epochs", "2", "--seed", "1")
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["user_auc"] <= 1.0 and metrics["logloss"] > 0
    assert (run / "model.pt").exists()


def test_bad_invocations_fail_clearly(tmp_path):
    bad = marn("train", "--model", "nope", "--data", str(tmp_path), "--out", str(tmp_path), check=False)
    assert bad.returncode == 2 and "unknown model" in bad.stderr
    (tmp_path / "typo.yaml").write_text("synth:\n  usres: 3\n")
    typo = marn(
        "data", "synth", "--out", str(tmp_path / "d"), "--config", str(tmp_path / "typo.yaml"), check=False
    )
    assert typo.returncode == 2 and "synth.usres" in typo.stderr and "typo.yaml" in typo.stderr


def test_movielens_import_validates_and_a_poisoned_copy_is_caught(shared_dir, tmp_path):
    src, media = shared_dir / "datasets" / "movielens-100k", shared_dir / "datasets" / "movielens-100k-media"
    if not (src / "u.data").exists():
        pytest.skip(f"MovieLens-100k not found at {src}; set MARN_SHARED_DIR")
    data = tmp_path / "ml"
    marn("data", "import", "movielens", "--src", str(src), "--media", str(media), "--out", str(data))
    assert marn("validate", "--data", str(data)).returncode == 0

    poisoned = tmp_path / "poisoned"
    shutil.copytree(data, poisoned)
    events = pd.read_parquet(poisoned / "events.parquet")
    events.loc[events.index[:3], "user_id"] = None
    events.loc[events.index[3:5], "ts"] = pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=30)
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), poisoned / "events.parquet")
    result = marn("validate", "--data", str(poisoned), check=False)
    assert result.returncode == 1
    assert "events.user_id" in result.stderr and "events.ts" in result.stderr
