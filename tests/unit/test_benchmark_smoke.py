"""Smoke test of benchmarks/model_speed.py: its core runs on the tiny world and measures something."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

_MEASURED = (
    "train_samples_per_s",
    "train_ms_per_batch",
    "infer_p50_ms",
    "infer_p95_ms",
    "infer_samples_per_s",
    "infer1_p50_ms",
    "infer1_p95_ms",
)


@pytest.fixture(scope="module")
def bench():
    from benchmarks import model_speed

    return model_speed


@pytest.fixture(scope="module")
def settings(bench):
    return bench.Settings(batches=2, batch_size=32, warmup=1, infer_batches=2, single=2, seed=1)


def _check_measured(row) -> None:
    assert row.skipped is None
    assert row.params > 0
    for name in _MEASURED:
        value = getattr(row, name)
        assert value is not None and math.isfinite(value) and value > 0, (row.model, name, value)


def test_registered_models_have_positive_throughput(bench, settings, tiny_world):
    result = bench.run_benchmark(
        tiny_world.catalog,
        tiny_world.features,
        tiny_world.model_cfg,
        tiny_world.train,
        settings,
        models=["lr", "marn"],
        references=False,
        log=lambda message: None,
    )
    assert [r.model for r in result.rows] == ["lr", "marn"]
    for row in result.rows:
        _check_measured(row)
    # ms/batch and samples/s are two views of one timing
    for row in result.rows:
        assert row.train_samples_per_s == pytest.approx(1000 * settings.batch_size / row.train_ms_per_batch)


def test_unknown_model_is_rejected(bench, settings, tiny_world):
    with pytest.raises(ValueError, match="nope"):
        bench.run_benchmark(
            tiny_world.catalog,
            tiny_world.features,
            tiny_world.model_cfg,
            tiny_world.train,
            settings,
            ["nope"],
        )


def test_stream_is_seeded_and_made_of_full_batches(bench, settings, tiny_world):
    a, b = (bench.build_stream(tiny_world.train, settings) for _ in range(2))
    assert len(a.warmup) == settings.warmup and len(a.timed) == settings.batches
    assert all(len(x["item"]) == settings.batch_size for x in a.warmup + a.timed)
    assert all(torch.equal(x["item"], y["item"]) for x, y in zip(a.timed, b.timed, strict=True))
    assert [len(x["item"]) for x in a.single] == [1] * settings.single
    assert torch.equal(a.single[1]["hist_items"][0], a.timed[0]["hist_items"][1])
    # more batches than samples wraps into a second shuffle instead of running short
    n = len(tiny_world.train)
    assert len(bench.stream_indices(tiny_world.train, 64, -(-2 * n // 64), 0)) == -(-2 * n // 64)


def test_ratios_divide_by_the_full_feature_din(bench):
    rows = [
        bench.Row("din", train_samples_per_s=1000.0),
        bench.Row("marn", train_samples_per_s=400.0),
        bench.Row("din[ids]", train_samples_per_s=3000.0, infer_p50_ms=2.0),
        bench.Row("deepctr din", train_samples_per_s=1500.0, infer_p50_ms=5.0),
        bench.Row("fm", skipped="build failed"),
    ]
    out = bench.ratios(rows)
    assert out["marn_cost_vs_din"] == pytest.approx(2.5)
    assert out["din_ids_vs_deepctr_train"] == pytest.approx(2.0)
    assert out["din_ids_vs_deepctr_infer_p50"] == pytest.approx(2.5)
    assert rows[0].cost_vs_din == pytest.approx(1.0)
    assert rows[-1].cost_vs_din is None
    # DeepCTR's faster row is the denominator of every goal
    rows.append(bench.Row(bench.DEEPCTR_DIN_PLAIN, train_samples_per_s=2000.0, infer_p50_ms=4.0))
    out = bench.ratios(rows)
    assert out["din_ids_vs_deepctr_train"] == pytest.approx(1.5)
    assert out["marn_vs_deepctr_train"] == pytest.approx(0.2)


def test_deepctr_din_trains_on_the_same_batches(bench, settings, tiny_world):
    if importlib.util.find_spec("deepctr_torch") is None:
        pytest.skip("deepctr_torch is not installed (optional: pip install deepctr-torch)")
    stream = bench.build_stream(tiny_world.train, settings)
    max_history = stream.timed[0]["hist_items"].shape[1]
    runner = bench.deepctr_din_runner(tiny_world.catalog, tiny_world.model_cfg, max_history)
    # its input matrix carries our batch: candidate ids, and the history's category looked up per item
    batch = stream.timed[0]
    x, label = runner.prepare(batch)
    assert torch.equal(label, batch["label"])
    index = runner.model.feature_index
    assert torch.equal(x[:, index["item_id"][0]].long(), batch["item"])
    attributes = torch.as_tensor(tiny_world.catalog.attributes)
    start, end = index["hist_category"]
    assert torch.equal(x[:, start:end].long(), attributes[batch["hist_items"], 0])
    assert torch.equal(x[:, index["seq_length"][0]].long(), batch["hist_len"])
    _check_measured(bench.measure(bench.DEEPCTR_DIN, runner, stream, settings))
