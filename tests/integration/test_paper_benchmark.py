"""benchmarks/paper.py end to end on a tiny synthetic world: Ray Tune, the grid as Ray tasks, the held-out
items, DeepCTR's references, then the report with its tables, figures and results JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL

from marn.config import load_config
from marn.data.synth import synthesize

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODELS = ("lr", "base_ids", "marn")  # the report's figures and Tables 4-5 need base_ids and MARN


def _paper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.paper", *args],
        cwd=REPO,  # benchmarks is a package of the repository root
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    synthesize(
        root / "data", load_config(None, {"synth": {"users": 120, "items": 60, "image_size": 16}}).synth
    )
    config = {
        "samples": {"max_history": 8},
        "train": {"epochs": 2, "batch_size": 128, "patience": 1, "clip_grad_norm": 1.0},
        "features": {"image": "pixels", "image_pixels": 4, "title_len": 8},
        "model": TINY_MODEL,
        "tune": {
            "trials": 2,
            "lr_range": [0.1, 0.1],
            "max_epochs": 1,
            "grace_epochs": 1,
            "cpus_per_trial": 1,
        },
    }
    (root / "paper.yaml").write_text(yaml.safe_dump(config))
    common = [
        "--data",
        str(root / "data"),
        "--work",
        str(root / "work"),
        "--config",
        str(root / "paper.yaml"),
    ]
    common += ["--seeds", "2"]
    ledger = ["--ledger", str(root / "ledger")]
    run = _paper("run", *common, "--models", ",".join(MODELS), *ledger)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = _paper("report", *common, "--out", str(root / "out"))
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    # Another machine: an empty WORK and the ledger the first one left (benchmarks/paper_ledger.py).
    elsewhere = [str(root / "work2") if arg == str(root / "work") else arg for arg in common]
    again = _paper("run", *elsewhere, "--models", ",".join(MODELS), *ledger)
    from_ledger = _paper(
        "report",
        *[str(root / "ledger") if arg == str(root / "work") else arg for arg in common],
        "--out",
        str(root / "out-ledger"),
    )
    assert from_ledger.returncode == 0, from_ledger.stdout[-3000:] + from_ledger.stderr[-3000:]
    return root, run.stdout, again


def test_the_grid_trains_every_model_and_seed_once(finished):
    root, log, again = finished
    assert "[tune] Ray Tune: 2 trials of marn" in log
    assert f"[runs] {len(MODELS)} models x 2 seeds: 0 done, {2 * len(MODELS)} to train" in log
    assert "[cold] 2 models x 2 seeds: 0 done, 4 to train" in log
    assert "[runs] 2 models x 2 seeds: 0 done, 4 to train" in log  # DeepCTR's DIN and DIEN
    assert "[batch32] 2 models x 2 seeds: 0 done, 4 to train" in log  # MARN and DIN at the paper's batch
    for model in ("marn", "din"):
        assert all(
            (root / "work" / "batch32" / model / f"seed-{s}" / "metrics.json").exists() for s in (1, 2)
        )
    for model in (*MODELS, "deepctr_din", "deepctr_dien"):
        for seed in (1, 2):
            run = root / "work" / "runs" / model / f"seed-{seed}"
            assert (run / "metrics.json").exists() and (run / "curves.json").exists()
            assert len(json.loads((run / "metrics.json").read_text())["commit"]) == 40  # the code it ran
    # A second run on an empty WORK with the first one's ledger: nothing is tuned or trained again.
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Ray Tune" not in again.stdout
    assert f"{len(MODELS)} models x 2 seeds: {2 * len(MODELS)} done, 0 to train" in again.stdout
    assert not list((root / "ledger").glob("**/resume.pt"))


def test_the_report_from_the_ledger_alone_is_the_report_from_work(finished):
    root, _, _ = finished
    from_work = json.loads((root / "out" / "paper-movielens.json").read_text())
    from_ledger = json.loads((root / "out-ledger" / "paper-movielens.json").read_text())
    assert from_ledger["models"] == from_work["models"]
    assert (root / "out-ledger" / "paper-movielens" / "fig5-tsne.png").exists()


def test_results_json_has_the_promised_shape(finished):
    root, _, _ = finished
    results = json.loads((root / "out" / "paper-movielens.json").read_text())
    assert set(results["models"]) == set(MODELS)
    assert set(results["references"]) == {"deepctr_din", "deepctr_dien"}
    for scores in [*results["models"].values(), *results["references"].values()]:
        assert len(scores["auc"]) == len(scores["user_auc"]) == 2
        assert all(0 < v < 1 for v in scores["auc"] + scores["user_auc"])
    assert results["command"].startswith("python -m benchmarks.paper run")
    assert len(results["commit"]) == 40 and "cores" in results["hardware"]
    assert results["wall_s"] > 0 and set(results["wall_s_by_stage"]) == {"tune", "runs", "cold", "batch32"}
    side = results["batch_side"]
    assert set(side) == {"marn", "din"} and set(side["marn"]) == {"128", "32"}  # din is not in --models
    assert set(side["din"]) == {"32"} and len(side["marn"]["32"]["auc"]) == 2
    assert 0.01 <= results["lambda0"] <= 1.8
    assert results["cold"]["marn"]["pool"] > 0 and results["cold"]["marn"]["recall"]
    assert len(results["popularity"]["levels"]) == 10


def test_report_shows_every_table_and_figure(finished):
    root, _, _ = finished
    report = (root / "out" / "paper-movielens.md").read_text()
    for heading in ("Table 2 analogue", "Table 3 analogue", "Table 4 analogue", "Table 5 analogue",
                    "Figure 4 analogue", "Figure 5 analogue", "Figure 6a analogue", "Figure 6b analogue",
                    "The paper's claims", "DeepCTR-Torch",
                    "Side experiment: the paper's batch size"):  # fmt: skip
        assert heading in report
    assert "| NAML | not run |" in report  # models outside --models are shown as missing, not dropped
    figures = sorted((root / "out" / "paper-movielens").glob("*.png"))
    assert {f.name for f in figures} == {
        "fig4-attention-by-genre.png",
        "fig5-tsne.png",
        "fig6a-losses.png",
        "fig6b-auc-vs-lambda0.png",
        "auc-by-model.png",
        "valid-auc-by-epoch.png",
    }
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"paper-movielens/{figure.name}" in report


def test_a_budget_starts_only_the_runs_expected_to_end_within_it(tmp_path):
    synthesize(tmp_path / "data", load_config(None, {"synth": {"users": 60, "items": 30}}).synth)
    common = ["--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"), "--seeds", "2"]
    common += ["--config", str(REPO / "configs" / "local.yaml"), "--models", "lr", "--no-cold"]
    common += ["--no-references", "--side-batch-seeds", "0"]
    short = _paper("run", *common, "--budget-min", "0.05")  # 3 s: an LR run is expected to take ~18 s
    assert short.returncode == 3, short.stdout[-3000:] + short.stderr[-3000:]  # unfinished: no report yet
    assert "[runs] 2 runs left for the next invocation" in short.stdout
    assert "2 runs left for the next invocation (--budget-min): the grid is unfinished" in short.stdout
    assert not list((tmp_path / "work" / "runs").glob("*/*/metrics.json"))
    enough = _paper("run", *common, "--budget-min", "30")
    assert enough.returncode == 0, enough.stdout[-3000:] + enough.stderr[-3000:]
    assert len(list((tmp_path / "work" / "runs").glob("lr/seed-*/metrics.json"))) == 2
