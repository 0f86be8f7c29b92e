"""The evaluation gate compares like with like: the champion is re-scored on the candidate's test split."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from marn.config import load_config
from marn.data.samples import build_samples, write_samples
from marn.data.schema import Dataset, read_dataset
from marn.data.synth import synthesize
from marn.registry import champion, gate, register_model
from marn.stages import evaluate_stage, registry_dir, score_checkpoint
from marn.train import train_model

SETTINGS = {
    "synth": {"users": 90, "items": 40, "events_per_user": 9, "seed": 4},
    "samples": {"max_history": 6},
    "train": {"model": "lr", "epochs": 2, "batch_size": 128},
    "features": {"image": "pixels", "image_pixels": 4, "title_len": 4},
}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Dataset A, and B = A plus new users: another test split. A champion trained and registered on A."""
    root = tmp_path_factory.mktemp("gate")
    cfg = load_config(None, {**SETTINGS, "paths": {"work_dir": str(root / "work")}})
    synthesize(root / "a", cfg.synth)
    a = read_dataset(root / "a")
    events = a.events.copy()
    newcomers = events[events["user_id"].isin(sorted(events["user_id"].unique())[:40])]
    newcomers = newcomers.assign(user_id="new-" + newcomers["user_id"].astype(str))
    b = Dataset(events=pd.concat([events, newcomers], ignore_index=True), items=a.items, root=a.root)
    first = train_model(a, cfg, root / "runs" / "a", show_progress=False)
    register_model(registry_dir(cfg), root / "runs" / "a", root / "a", gate(first.metrics, None, 0.0))
    samples_b = root / "samples-b"
    write_samples(samples_b, build_samples(b, cfg.samples))
    second = train_model(
        b,
        load_config(None, {**SETTINGS, "train": {**SETTINGS["train"], "seed": 9}}),
        root / "runs" / "b",
        show_progress=False,
    )
    return cfg, root, samples_b, second


def test_the_champion_is_rescored_on_the_candidates_test_split(worlds):
    cfg, root, samples_b, _ = worlds
    current = champion(registry_dir(cfg), "lr")
    evaluation = evaluate_stage(root / "runs" / "b", samples_b, cfg)
    from marn.data.samples import read_samples

    rescored = score_checkpoint(current.checkpoint, read_samples(samples_b).test)
    decision = evaluation["gate"]
    assert decision["champion_auc"] == pytest.approx(rescored["auc"], abs=1e-12)
    assert evaluation["champion_metrics"]["auc"] == pytest.approx(rescored["auc"], abs=1e-12)
    assert rescored["auc"] != current.metrics["auc"]  # the stored AUC is of split A: not what is compared
    assert "same test split" in decision["reason"]
    assert decision["passed"] == (evaluation["metrics"]["auc"] > rescored["auc"])


def test_the_gate_refuses_when_the_champion_cannot_be_scored_and_says_why(worlds):
    cfg, root, samples_b, _ = worlds
    current = champion(registry_dir(cfg), "lr")
    saved = torch.load(current.checkpoint, weights_only=True)
    del saved["features"]["statistics"]  # a checkpoint from before point-in-time statistics
    torch.save(saved, current.checkpoint)
    decision = evaluate_stage(root / "runs" / "b", samples_b, cfg)["gate"]
    assert decision["passed"] is False
    assert "could not be scored" in decision["reason"] and "point-in-time" in decision["reason"]
