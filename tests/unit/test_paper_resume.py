"""A paper grid stopped at any moment loses little: ``train_one`` resumes a run after its last finished
epoch and ends exactly where the uninterrupted run ends (weights, scores, per-step losses), a damaged resume
state is refused, and a stage's wall seconds reach ``timing.json`` while it runs."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import TINY_MODEL  # tests/ is on sys.path

from benchmarks import paper
from marn.config import load_config
from marn.data.schema import read_dataset
from marn.data.synth import synthesize
from marn.train import prepare_inputs

ROW = "marn"  # dropout, the lambda schedule and the adversary: every piece of state a resume must restore


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-resume")
    cfg = load_config(
        None,
        {
            "synth": {"users": 80, "items": 40, "events_per_user": 10, "seed": 4},
            "samples": {"max_history": 6},
            # patience above the epochs: every run trains all 4, so the stop is the only difference
            "train": {"epochs": 4, "patience": 5, "batch_size": 64, "model": ROW},
            "model": {**TINY_MODEL, "dropout": 0.2},
        },
    )
    synthesize(root, cfg.synth)
    return prepare_inputs(read_dataset(root), cfg), cfg


class Stopped(Exception):
    """Stands in for the grid being killed between two epochs."""


def _stop_after(monkeypatch, epochs: int) -> None:
    written = []
    real = paper.write_resume

    def stop_when_written(path, state):
        real(path, state)
        written.append(state.fit.epoch)
        if len(written) == epochs:
            raise Stopped

    monkeypatch.setattr(paper, "write_resume", stop_when_written)


def test_a_stopped_run_resumes_where_it_stopped_and_matches_the_uninterrupted_one(
    run_inputs, tmp_path, monkeypatch
):
    inputs, cfg = run_inputs
    whole = paper.train_one(inputs, cfg, ROW, 3, str(tmp_path / "whole"))
    assert not (tmp_path / "whole" / paper.RESUME).exists()  # a finished run leaves no state behind

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _stop_after(patch, 1)
        with pytest.raises(Stopped):
            paper.train_one(inputs, cfg, ROW, 3, str(out))
    with monkeypatch.context() as patch:  # stopped again, after the third epoch
        _stop_after(patch, 2)
        with pytest.raises(Stopped):
            paper.train_one(inputs, cfg, ROW, 3, str(out))
    assert (out / paper.RESUME).exists() and not (out / "metrics.json").exists()
    resumed = paper.train_one(inputs, cfg, ROW, 3, str(out))

    assert resumed["auc"] == whole["auc"] and resumed["user_auc"] == whole["user_auc"]
    assert resumed["epochs"] == whole["epochs"] == 4
    metrics = {
        name: json.loads((d / "metrics.json").read_text())
        for name, d in (("whole", tmp_path / "whole"), ("resumed", out))
    }
    assert metrics["resumed"]["resumed_after_epochs"] == [1, 3]
    assert metrics["whole"]["resumed_after_epochs"] == []
    history = {
        name: [(h["epoch"], h["train_loss"], h["valid_auc"]) for h in m["history"]]
        for name, m in metrics.items()
    }
    assert history["resumed"] == history["whole"]
    curves = {
        name: json.loads((d / paper.CURVES).read_text())
        for name, d in (("whole", tmp_path / "whole"), ("resumed", out))
    }
    assert curves["resumed"] == curves["whole"]  # every step's losses, once each
    weights = {
        name: torch.load(d / "model.pt", weights_only=True)["state_dict"]
        for name, d in (("whole", tmp_path / "whole"), ("resumed", out))
    }
    assert weights["resumed"].keys() == weights["whole"].keys()
    for key, value in weights["whole"].items():
        torch.testing.assert_close(weights["resumed"][key], value, rtol=0, atol=0)
    assert not (out / paper.RESUME).exists()


def test_a_damaged_resume_state_is_refused_not_silently_retrained(run_inputs, tmp_path):
    inputs, cfg = run_inputs
    (tmp_path / paper.RESUME).write_bytes(b"half a file")
    with pytest.raises(ValueError, match="not a readable resume state"):
        paper.train_one(inputs, cfg, ROW, 1, str(tmp_path))
    assert not (tmp_path / "metrics.json").exists()


def test_a_stage_clock_writes_its_seconds_while_the_stage_runs_not_only_at_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "TICK_S", 0.05)
    (tmp_path / paper.TIMING).write_text(json.dumps({"tune": 10.0}))  # an earlier invocation's
    timing = lambda: json.loads((tmp_path / paper.TIMING).read_text())  # noqa: E731
    started = time.perf_counter()
    with paper._timed(tmp_path, "runs"):
        deadline = time.monotonic() + 5
        while "runs" not in timing() and time.monotonic() < deadline:  # a kill now would keep this much
            time.sleep(0.01)
        assert 0 < timing()["runs"] < 5
    elapsed = time.perf_counter() - started
    assert timing()["tune"] == 10.0
    assert timing()["runs"] == pytest.approx(elapsed, abs=0.05)
