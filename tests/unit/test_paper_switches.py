"""benchmarks/paper.py's switch rows of MARN's adversary and per-variant lambda0, and the report's reading of
the adversary's instrumentation (with runs from before it was logged)."""

from __future__ import annotations

import json

import pytest
import torch
from test_paper_tables import _summary

from benchmarks import paper
from benchmarks.paper_report.figures import figure_losses
from benchmarks.paper_report.markdown import instrumentation_table
from benchmarks.paper_report.runs import LABELS, SWITCH_ROWS, Summary, instrumentation, stopped_early
from marn.config import load_config
from marn.models.marn import VARIANTS
from marn.train import FitState

CONFIG = load_config(None, {"train": {"lr": 0.1}})


def test_every_switch_row_is_marn_with_only_its_switches_flipped():
    rows = paper.grid_rows()
    assert rows[: len(paper.paper_models())] == paper.paper_models()
    marn = paper.row_config(CONFIG, "marn")
    for row, (model, switches) in SWITCH_ROWS.items():
        assert row in rows and row in LABELS
        cfg = paper.row_config(CONFIG, row)
        assert cfg.train.model == model == "marn"
        changed = {k for k, v in cfg.model.model_dump().items() if v != marn.model.model_dump()[k]}
        assert changed == set(switches)  # each switch is a real field, set away from its default
    assert paper.grid_rows(["lr", "marn_w_raw"]) == ("lr", "marn_w_raw")
    with pytest.raises(ValueError, match="unknown models"):
        paper.grid_rows(["marn_typo"])


def test_lambda0_is_searched_per_adversarial_variant():
    for model in ("base_maf_adv", "base_maf_ddma", "marn"):
        assert paper.lambda0_source(model) == model
    assert paper.lambda0_source("marn_w_raw") == "marn"
    assert paper.lambda0_source("marn_lambda_grl") == "marn_lambda_grl"  # lambda means another thing there
    adversarial = {n for n in VARIANTS if paper.is_adversarial(paper.row_config(CONFIG, n))}
    assert adversarial == {"base_maf_adv", "base_maf_ddma", "marn"}
    assert not paper.is_adversarial(paper.row_config(CONFIG, "din"))


def _fake_search(paper, work, row: str, lambda0: float, **model_changes) -> None:
    cfg = paper.row_config(CONFIG, row)
    path = work / "tune" / row / "tune.json"
    path.parent.mkdir(parents=True)
    report = {
        "model": cfg.train.model,
        "search": {"lr_range": [0.1, 0.1], "max_epochs": 2},  # a tune.json from before "overrides"
        "model_config": {**cfg.model.model_dump(mode="json"), **model_changes},
        "best": {"lambda0": lambda0, "lr": 0.1},
        "best_valid_auc": 0.8,
        "trials": [{"lambda0": lambda0, "valid_auc": 0.8}],
    }
    path.write_text(json.dumps(report))


def test_each_row_trains_with_its_own_variants_lambda0(tmp_path):
    searched = {"base_maf_adv": 0.7, "base_maf_ddma": 0.2, "marn": 0.6, "marn_lambda_grl": 1.3}
    for row, value in searched.items():
        _fake_search(paper, tmp_path, row, value)
    rows = [
        "lr",
        "base_maf_adv",
        "base_maf_ddma",
        "marn",
        "marn_w_raw",
        "marn_lambda_grl",
        "marn_lambda_paper",
    ]
    configs = paper.tuned_configs(None, CONFIG, rows, tmp_path)  # every search exists: no Ray, no data
    lambda0 = {row: cfg.model.lambda0 for row, cfg in configs.items()}
    # marn_lambda_paper: the paper's 0.05 whatever MARN's search found, on that search's horizon
    assert lambda0 == {**searched, "lr": CONFIG.model.lambda0, "marn_w_raw": 0.6, "marn_lambda_paper": 0.05}
    assert configs["marn_w_raw"].model.d1_weights == "raw"
    horizon = {row: cfg.train.lambda_horizon_epochs for row, cfg in configs.items()}
    assert horizon == {**dict.fromkeys(rows, 2), "lr": None}  # each search's own; lr has no schedule
    assert configs["marn_lambda_grl"].model.lambda_role == "reversal"


def test_a_search_of_other_model_settings_is_refused(tmp_path):
    _fake_search(paper, tmp_path, "marn", 0.05, reversal_reaches="embedding")  # searched before a switch
    with pytest.raises(ValueError, match="reversal_reaches"):
        paper.tuned_configs(None, CONFIG, ["marn"], tmp_path)


def _steps(n: int, logged: bool) -> list[dict[str, float]]:
    rows = []
    for k in range(1, n + 1):
        row = {"step": k, "ctr": 0.7 - 0.001 * k, "adv": 1.0 / k, "d0": 0.1, "ds": 0.2}
        if logged:
            row |= {"d1_ce": 0.5 + 0.002 * k, "d1_acc": 0.9, "d0_acc": 1.0, "ds_acc": 1.0}
            row |= {"w_norm_ids": 0.8, "w_norm_image": 1.2, "w_raw_ids": 0.01, "w_raw_image": 0.015}
        rows.append(row)
    return rows


def test_figure_6a_trends_the_unweighted_d1_loss_and_still_reads_old_runs(tmp_path):
    new = figure_losses(tmp_path / "new.png", {"steps_per_epoch": 20, "steps": _steps(60, True)})
    assert new["loss"] == "d1_ce" and new["adv_last_tenth"] > new["adv_first_tenth"]  # w-weighted adv falls
    old = figure_losses(tmp_path / "old.png", {"steps_per_epoch": 20, "steps": _steps(60, False)})
    assert old["loss"] == "adv" and old["adv_last_tenth"] < old["adv_first_tenth"]
    for name in ("new.png", "old.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_instrumentation_at_the_best_epoch_and_early_stopping():
    logged = _summary("marn", [0.8, 0.81])
    logged.best_rows.extend(
        {
            "epoch": 2,
            "valid_auc": 0.8,
            "d1_ce": ce,
            "d1_acc": 0.5,
            "d0_acc": 1.0,
            "ds_acc": 0.9,
            "w_norm_ids": 0.9,
        }
        for ce in (1.2, 1.4)
    )
    assert instrumentation(logged) == {
        "d1_ce": [1.2, 1.4],
        "d1_acc": [0.5, 0.5],
        "d0_acc": [1.0, 1.0],
        "ds_acc": [0.9, 0.9],
        "w_norm_ids": [0.9, 0.9],
    }
    old = _summary("base_maf_ddma", [0.8, 0.81])
    old.best_rows.extend({"epoch": 2, "valid_auc": 0.8, "adv": 0.01} for _ in range(2))
    assert instrumentation(old) == {}
    table = instrumentation_table({"marn": logged, "base_maf_ddma": old}, ["base_maf_ddma", "marn"])
    assert "| MARN | 1.300 | 0.500 | 1.000 | 0.900 | 0.900 |" in table and "DDMA" not in table
    assert instrumentation_table({"base_maf_ddma": old}, ["base_maf_ddma"]) == ""
    # _summary's runs: 2 epochs, best 2: the cap ended them, not early stopping
    assert stopped_early(logged, patience=1) == [False, False]
    stopped = Summary("x", [0.8], [0.8], [3], [1.0], [1], [[0.8, 0.7, 0.7]])
    assert stopped_early(stopped, patience=2) == [True]


def test_pending_runs_are_estimated_from_the_finished_runs_of_their_model(tmp_path):
    def finished(experiment: str, row: str, seed: int, model: str, wall_s: float) -> None:
        path = paper.run_dir(tmp_path, experiment, row, seed) / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"model": model, "wall_s": wall_s}))

    finished("runs", "marn", 1, "marn", 1000.0)
    finished("runs", "marn_w_raw", 1, "marn", 1400.0)  # a switch row counts as the model it trains
    finished("runs", "marn", 2, "marn", 1100.0)
    finished("batch32", "din", 1, "din", 9000.0)
    (paper.run_dir(tmp_path, "runs", "lr", 1) / "metrics.json").parent.mkdir(parents=True)
    (paper.run_dir(tmp_path, "runs", "lr", 1) / "metrics.json").write_text("{")  # being written: skipped
    measured = paper.measured_run_seconds(tmp_path)
    assert measured == {("runs", "marn"): 1100.0, ("batch32", "din"): 9000.0}

    def expected(experiment: str, row: str) -> float:
        return paper.expected_run_seconds(measured, experiment, row, paper.row_config(CONFIG, row))

    assert expected("runs", "marn_lambda_paper") == 1100.0
    assert expected("cold", "marn") == 1100.0  # no cold run yet: the grid's
    assert expected("batch32", "din") == 9000.0
    assert expected("runs", "din") == 60 * paper.TYPICAL_EPOCHS  # nothing measured: the rough figure
    assert expected("runs", "lr") == paper.EPOCH_COST["lr"] * paper.TYPICAL_EPOCHS
    assert expected("batch32", "marn") is None  # 32x the steps: the grid's runs say nothing about it
    assert paper.time_left([600.0, 1200.0, 1800.0], cores=2) == "about 30 min left"
    assert paper.time_left([600.0, None], cores=2) == "about 10 min left + 1 runs of unknown length"


def test_under_a_deadline_the_longest_run_that_ends_before_it_starts_next():
    queue = [("marn", 1), ("din", 1), ("lr", 1), ("marn", 9)]  # longest first, as run_experiment sorts
    expected = {("marn", 1): 1200.0, ("din", 1): 600.0, ("lr", 1): 30.0, ("marn", 9): None}
    assert paper.next_run(queue, expected, now=0.0, deadline=None) == ("marn", 1)
    assert paper.next_run(queue, expected, now=0.0, deadline=1200.0) == ("marn", 1)
    assert paper.next_run(queue, expected, now=1.0, deadline=1200.0) == ("din", 1)
    assert paper.next_run(queue, expected, now=1000.0, deadline=1200.0) == ("lr", 1)
    assert paper.next_run(queue, expected, now=1190.0, deadline=1200.0) is None
    assert paper.next_run([("marn", 9)], expected, now=0.0, deadline=1e12) is None  # unknown length
    assert paper.next_run([("marn", 9)], expected, now=0.0, deadline=None) == ("marn", 9)


def test_status_reads_finished_half_done_and_missing_runs_from_work_alone(tmp_path):
    for seed, auc in ((1, 0.90), (2, 0.92)):
        path = paper.run_dir(tmp_path, "runs", "din", seed) / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"model": "din", "wall_s": 600.0, "auc": auc}))
    fit = FitState(
        epoch=4, model_state={}, optimizer_state={}, best_state={}, best_auc=0.8, stale=0, history=(),
        shuffle_state=torch.Generator().get_state(), rng_state=torch.get_rng_state(),
    )  # fmt: skip
    half = paper.run_dir(tmp_path, "runs", "din", 3)
    half.mkdir(parents=True)
    paper.write_resume(half / paper.RESUME, paper.ResumeState(fit, (), 120.0, ()))
    statuses = {
        (s.experiment, s.row): s for s in paper.grid_status(tmp_path, CONFIG, seeds=3, side_batch_seeds=1)
    }
    din = statuses[("runs", "din")]
    assert (din.finished, din.seeds, din.auc, din.in_progress) == (2, 3, (0.90, 0.92), {3: 4})
    assert din.left_s == [600.0]  # seed 3, counted whole
    assert statuses[("batch32", "din")].seeds == 1 and statuses[("batch32", "din")].left_s == [None]
    assert statuses[("cold", "marn")].finished == 0
    assert set(statuses) >= {("runs", r) for r in paper.grid_rows()}


def test_a_search_from_before_a_new_setting_counts_as_run_with_its_default(tmp_path):
    _fake_search(paper, tmp_path, "marn", 0.4)
    path = tmp_path / "tune" / "marn" / "tune.json"
    report = json.loads(path.read_text())
    del report["model_config"]["ds_weights"]  # written before the setting existed
    path.write_text(json.dumps(report))
    configs = paper.tuned_configs(None, CONFIG, ["marn", "marn_ds_own"], tmp_path)
    assert configs["marn"].model.lambda0 == configs["marn_ds_own"].model.lambda0 == 0.4
    report["model_config"]["ds_weights"] = "own"  # a search that did run with another value: refused
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="ds_weights"):
        paper.tuned_configs(None, CONFIG, ["marn"], tmp_path)
