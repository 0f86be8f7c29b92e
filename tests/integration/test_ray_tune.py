"""Ray Tune on a real local Ray: a seeded ASHA search over lambda0 and lr that only ever sees validation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL  # tests/ is on sys.path: pytest imports conftest from there
from rich.console import Console

from marn.config import SynthConfig, load_config
from marn.data.schema import read_dataset
from marn.data.synth import synthesize
from marn.tune import read_tune_overrides, tune_hyperparameters

pytestmark = pytest.mark.slow

LAMBDA0_RANGE, LR_RANGE = (0.01, 1.8), (0.03, 0.3)


def _keys(value: object) -> set[str]:
    """Every dict key at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_asha_search_writes_tune_json_and_never_sees_test(tmp_path):
    synthesize(tmp_path / "data", SynthConfig(users=60, items=80, seed=3))
    glove = tmp_path / "glove.txt"  # a tiny word-vector file: the 400k-word default is slow to load
    glove.write_text("red 0.1 0.2 0.3\nblue -0.1 0.0 0.2\n")
    cfg = load_config(
        None,
        {
            "train": {"batch_size": 128},
            "model": TINY_MODEL,
            "features": {"image": "pixels", "image_pixels": 4, "word_vectors": str(glove)},
            "tune": {
                "model": "base_maf_adv",
                "trials": 3,
                "max_epochs": 2,
                "grace_epochs": 1,
                "cpus_per_trial": 0.5,
                "lambda0_range": LAMBDA0_RANGE,
                "lr_range": LR_RANGE,
            },
        },
    )
    console = Console(file=io.StringIO(), width=160)  # not a terminal: one line per result
    result = tune_hyperparameters(read_dataset(tmp_path / "data"), cfg, tmp_path / "tune", console=console)

    saved = json.loads(result.path.read_text())
    assert result.path == tmp_path / "tune" / "tune.json"
    assert saved["best"] == result.best and saved["best_valid_auc"] == result.best_valid_auc
    assert LAMBDA0_RANGE[0] <= result.best["lambda0"] <= LAMBDA0_RANGE[1]
    assert LR_RANGE[0] <= result.best["lr"] <= LR_RANGE[1]

    trials = saved["trials"]
    assert len(trials) == 3 and all(t["error"] is None for t in trials)
    assert len({t["lambda0"] for t in trials}) == 3  # three sampled points, not one repeated
    # Every trial ran the grace epoch; ASHA let some run to max_epochs and may have stopped others at 1.
    assert all(1 <= t["epochs"] <= 2 and t["stopped_early"] == (t["epochs"] < 2) for t in trials)
    assert [h["epoch"] for h in trials[0]["history"]] == list(range(1, trials[0]["epochs"] + 1))
    assert result.best_valid_auc == max(t["valid_auc"] for t in trials)
    # The live trial report: a line per epoch result as it arrived, then each trial's end
    lines = console.file.getvalue().splitlines()
    for t in trials:
        own = [line for line in lines if line.startswith(f"trial {t['trial_id']} ")]
        assert all(f"epochs {h['epoch']} " in line for line, h in zip(own, t["history"], strict=False))
        assert len(own) == t["epochs"] + 1 and own[-1].endswith("TERMINATED")
        assert f"valid AUC {t['history'][-1]['valid_auc']:.4f}" in own[-1]
    assert 0.0 <= result.best_valid_auc <= 1.0

    # Nothing Ray recorded for any trial mentions a test metric: the trials never had the test split.
    recorded = [json.loads(line) for f in Path(saved["ray_run"]).glob("*/result.json") for line in f.open()]
    assert len(recorded) == sum(t["epochs"] for t in trials)
    assert "valid_auc" in _keys(recorded)
    assert not {k for k in _keys(recorded) | _keys(trials) if k.startswith("test") or k.endswith("test")}

    # What `marn train --params tune.json` applies: the best values and the trials' schedule horizon.
    assert saved["overrides"] == result.overrides and saved["lambda_horizon_epochs"] == 2
    train_cfg = cfg.with_overrides({"train.model": "base_maf_adv"})  # train.epochs stays 5
    tuned = train_cfg.with_overrides(read_tune_overrides(result.path, train_cfg))
    assert tuned.model.lambda0 == result.best["lambda0"] and tuned.train.lr == result.best["lr"]
    assert (tuned.train.epochs, tuned.train.lambda_horizon_epochs) == (5, 2)
