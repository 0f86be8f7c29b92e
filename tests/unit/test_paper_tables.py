"""benchmarks/paper.py and benchmarks/paper_report/: the held-out-items data, tables and claim checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import paper
from benchmarks.paper_report.claims import table_claims
from benchmarks.paper_report.markdown import (
    cold_markdown,
    model_table,
    popularity_ladder_markdown,
    popularity_markdown,
)
from benchmarks.paper_report.runs import TABLE2, TABLE3, Summary
from benchmarks.paper_report.significance import auc_standard_error, welch
from marn.data.tensors import PAD, EncodedSamples
from marn.models import model_names


def test_the_grid_is_every_registered_model_once():
    models = paper.paper_models()
    assert sorted(models) == sorted(model_names())
    assert len(models) == len(set(models)) == 18  # the paper's 17 and the popularity reference


def test_cold_items_are_a_seeded_share_of_real_item_codes():
    held = paper.cold_items(200, 0.1, seed=3)
    assert len(held) == 20 and held.min() >= 1 and held.max() <= 200
    assert torch.equal(held, torch.sort(held).values) and len(torch.unique(held)) == 20
    assert torch.equal(held, paper.cold_items(200, 0.1, seed=3))
    assert not torch.equal(held, paper.cold_items(200, 0.1, seed=4))
    with pytest.raises(ValueError, match="share"):
        paper.cold_items(200, 1.0, seed=3)


def test_without_items_drops_candidates_and_cuts_histories():
    t = {
        "item": torch.tensor([5, 7, 9]),
        "label": torch.tensor([1.0, 0.0, 1.0]),
        "hist_items": torch.tensor([[1, 7, 2, PAD], [3, 4, PAD, PAD], [7, 7, 8, 6]]),
        "hist_behavior": torch.tensor([[1, 2, 1, PAD], [1, 1, PAD, PAD], [2, 2, 1, 1]]),
        "hist_gap": torch.tensor([[4, 3, 2, PAD], [2, 1, PAD, PAD], [9, 8, 7, 6]]),
        "hist_len": torch.tensor([3, 2, 4]),
    }
    t["item_stats"] = t["item"].view(3, 1, 1).expand(3, 2, 2).to(torch.int16)  # (N, F, G) = the item code
    t["hist_stats"] = t["hist_items"].view(3, 4, 1, 1).expand(3, 4, 2, 2).to(torch.int16)  # each entry's own
    times = np.array(["2025-01-01", "2025-01-02", "2025-01-03"], dtype="datetime64[us]")
    out = paper.without_items(EncodedSamples(np.array(["a", "b", "c"]), times, t), torch.tensor([7]))
    assert out.users.tolist() == ["a", "c"]  # b's candidate 7 is held out
    assert out.tensors["item"].tolist() == [5, 9]
    assert out.tensors["hist_len"].tolist() == [2, 2]
    assert out.tensors["hist_items"].tolist() == [[1, 2, PAD, PAD], [8, 6, PAD, PAD]]
    assert out.tensors["hist_behavior"].tolist() == [[1, 1, PAD, PAD], [1, 1, PAD, PAD]]
    assert out.tensors["hist_gap"].tolist() == [[4, 2, PAD, PAD], [7, 6, PAD, PAD]]
    assert out.tensors["label"].tolist() == [1.0, 1.0]
    assert out.tensors["item_stats"][:, 0, 0].tolist() == [5, 9]  # the statistics move with their entries
    assert out.tensors["hist_stats"][:, :, 1, 1].tolist() == [[1, 2, PAD, PAD], [8, 6, PAD, PAD]]
    assert out.times.tolist() == times[[0, 2]].tolist()


def test_welch_matches_a_hand_computation():
    a, b = [0.80, 0.81, 0.82], [0.78, 0.79, 0.77]
    # means 0.81 and 0.78, both variances 1e-4: t = 0.03 / sqrt(2e-4 / 3)
    result = welch(a, b)
    assert result["t"] == pytest.approx(0.03 / np.sqrt(2e-4 / 3))
    assert result["p_one_sided"] == pytest.approx(result["p_two_sided"] / 2)
    assert welch(b, a)["p_one_sided"] == pytest.approx(1 - result["p_two_sided"] / 2)


def _summary(name: str, aucs: list[float]):
    return Summary(name, aucs, aucs, [2] * len(aucs), [1.0] * len(aucs), [2] * len(aucs), [[0.6, 0.7]])


def test_claims_follow_the_numbers():
    runs = {name: _summary(name, [0.70 + 0.001 * k for k in range(5)]) for name in TABLE2 + TABLE3}
    runs["marn"] = _summary("marn", [0.75, 0.751, 0.752, 0.753, 0.754])  # far ahead
    runs["lr"] = _summary("lr", [0.60, 0.601, 0.602, 0.603, 0.604])
    claims = {c.text: c for c in table_claims(runs)}
    best = claims["MARN beats the best other model significantly (Table 2)"]
    assert best.holds is True and "MARN 0.7520" in best.here
    assert claims["Neural models beat LR and FM (group 1)"].holds is False  # FM ties the neural models
    assert claims["MAF beats CONC"].holds is False  # equal runs: not significant
    runs["base_maf"] = _summary("base_maf", [0.69, 0.691, 0.692, 0.693, 0.694])
    assert {c.text: c for c in table_claims(runs)}["MAF beats CONC"].holds is False
    del runs["base_conc"]
    assert {c.text: c for c in table_claims(runs)}["MAF beats CONC"].holds is None


def test_model_table_marks_missing_models():
    table = model_table({"marn": _summary("marn", [0.8, 0.82])}, ["marn", "naml"])
    lines = table.splitlines()
    assert lines[2].startswith("| MARN | 0.8100 ± 0.0141 |") and "0.8034 / 0.7909 / 0.7486" in lines[2]
    assert lines[3].startswith("| NAML | not run |")


def test_popularity_and_cold_tables():
    levels = [{"level": k, "samples": 10, "min_count": k, "max_count": k + 1} for k in range(10)]
    table = {
        "levels": levels,
        "base_ids": [[0.60]] * 5 + [[0.80]] * 5,
        "marn": [[0.70]] * 5 + [[0.80]] * 5,
    }
    markdown, (claim,) = popularity_markdown(table)
    assert "| GAP | +10.0% |" in markdown and claim.holds is True
    table["marn"] = [[0.60]] * 5 + [[0.85]] * 5
    assert popularity_markdown(table)[1][0].holds is False

    cold = {
        name: {
            "users": 40,
            "pool": 50,
            "auc": [0.7, 0.72],
            "recall": {"10": [r, r], "50": [r + 0.5, r + 0.5]},
        }
        for name, r in (("base_ids", 0.2), ("marn", 0.3))
    }
    markdown, (claim,) = cold_markdown(cold)
    assert "| RANDOM (expected) | 20.0% | 100.0% |" in markdown
    assert claim.holds is True and "2 of 2" in claim.here


def test_popularity_ladder_shows_marns_difference_per_level_and_model():
    levels = [{"level": k, "samples": 10, "min_count": 2 * k, "max_count": 2 * k + 1} for k in range(3)]
    table = {
        "levels": levels,
        "marn": [[0.70, 0.72], [0.80], [0.90]],
        "base_maf": [[0.69, 0.71], [0.82], []],  # no seed scored level 2: shown as nan, not as 0
        "dmf": [[0.60], [0.80], [0.95]],
    }
    lines = popularity_ladder_markdown(table, ["marn", "base_maf", "dmf"]).splitlines()
    assert lines[2] == "| training clicks per item | 0-1 | 2-3 | 4-5 |"
    assert lines[3] == "| MARN | 0.710 | 0.800 | 0.900 |"
    assert lines[4] == "| BaseModel+MAF | 0.700 | 0.820 | nan |"
    assert lines[6] == "| MARN - BaseModel+MAF | +1.0 | -2.0 | +nan |"
    assert lines[7] == "| MARN - DMF | +11.0 | +0.0 | -5.0 |"


def test_auc_standard_error_matches_hanley_mcneil():
    # Chance AUC with 50 + 50 samples: variance (0.25 + 2 * 49 * (1/3 - 1/4)) / 2500, SE about 0.0580.
    assert auc_standard_error(0.5, 50, 50) == pytest.approx(0.0580, abs=1e-4)
    assert auc_standard_error(0.85, 943, 943) < auc_standard_error(0.85, 100, 100)


def test_held_out_items_are_held_out_of_the_statistics_too(tmp_path):
    """Table 5's items: dropped from train and valid, and their counts come from test clicks alone, so a
    held-out item's test candidate reads the count of earlier test clicks, never of its removed events."""
    from marn.config import load_config
    from marn.data.schema import read_dataset
    from marn.data.stats import stats_before
    from marn.data.synth import synthesize
    from marn.train import prepare_inputs

    cfg = load_config(
        None,
        {
            "synth": {"users": 80, "items": 30, "events_per_user": 10, "seed": 2},
            "samples": {"max_history": 6},
            "features": {"image": "pixels", "image_pixels": 4, "title_len": 4},
        },
    )
    synthesize(tmp_path, cfg.synth)
    dataset = read_dataset(tmp_path)
    inputs = prepare_inputs(dataset, cfg)
    held, held_out = paper.cold_inputs(dataset, inputs, share=0.2, seed=1)
    ids = np.asarray(inputs.catalog.items.values, dtype=object)[held_out.numpy() - 1]
    # the statistic table: held-out items count only test clicks (each user's last event)
    events = dataset.events.sort_values(["user_id", "ts"])
    last = events.groupby("user_id").tail(1)
    for item in ids:
        rows = held.item_stats[held.item_stats["item_id"] == item]
        assert rows["n_events"].max() == (last["item_id"] == item).sum()
    others = inputs.item_stats[~inputs.item_stats["item_id"].isin(ids)]
    assert others.reset_index(drop=True).equals(
        held.item_stats[~held.item_stats["item_id"].isin(ids)].reset_index(drop=True)
    )
    # the test candidates that are held out read those counts, bucketed as the model buckets them
    test = held.test
    on_held = torch.isin(test.tensors["item"], held_out)
    assert on_held.any()
    rows = torch.nonzero(on_held).flatten()
    codes = paper.stat_codes(
        held.item_stats,
        np.asarray(("", *inputs.catalog.items.values), dtype=object)[test.tensors["item"][rows].numpy()],
        test.times[rows.numpy()],
        inputs.features.statistics,
    )
    assert np.array_equal(test.tensors["item_stats"][rows].numpy(), codes)
    assert not torch.equal(test.tensors["item_stats"], inputs.test.tensors["item_stats"])  # they moved
    counts = stats_before(held.item_stats, ids, np.repeat(test.times.max(), len(ids)))[:, 0]
    full = stats_before(inputs.item_stats, ids, np.repeat(test.times.max(), len(ids)))[:, 0]
    assert (counts <= full).all() and (counts < full).any()
    # train and valid never mention them
    for split in (held.train, held.valid):
        assert not torch.isin(split.tensors["item"], held_out).any()
        real = (
            torch.arange(split.tensors["hist_items"].shape[1])[None, :] < split.tensors["hist_len"][:, None]
        )
        assert not (torch.isin(split.tensors["hist_items"], held_out) & real).any()


def test_batch_side_table_reads_both_batch_sizes_per_seed(tmp_path):
    """The batch-32 side experiment is read beside the grid's rows of the same models, one entry per seed;
    a model without side runs is left out, and no side run at all gives None."""
    import json

    from benchmarks.paper_report.markdown import batch_side_markdown
    from benchmarks.paper_report.runs import SIDE_BATCH_SIZE, batch_side_table
    from marn.train import METRICS

    assert batch_side_table(tmp_path, seeds=2, grid_batch=1024) is None

    def write(experiment, model, seed, auc, epochs):
        run = tmp_path / experiment / model / f"seed-{seed}"
        run.mkdir(parents=True)
        history = [{"epoch": e, "valid_auc": 0.8 + 0.01 * e} for e in range(1, epochs + 1)]
        metrics = {"auc": auc, "user_auc": auc - 0.02, "epochs_run": epochs, "wall_s": 60.0 * epochs}
        (run / METRICS).write_text(json.dumps(metrics | {"best_epoch": epochs - 1, "history": history}))

    for seed in (1, 2):
        write("runs", "marn", seed, 0.88 + 0.01 * seed, 10)
        write("runs", "din", seed, 0.87, 5)
        write(f"batch{SIDE_BATCH_SIZE}", "marn", seed, 0.90, 4)
    table = batch_side_table(tmp_path, seeds=2, grid_batch=1024)
    assert list(table) == ["marn"]  # din has no side runs
    assert table["marn"]["1024"]["auc"] == [0.89, 0.90] and table["marn"]["32"]["epochs_run"] == [4, 4]
    assert table["marn"]["32"]["best_epoch"] == [3, 3]
    text = batch_side_markdown(table)
    assert "| 32 |" in text and "| 1024 |" in text and "0.8950" in text  # the 1024 mean
