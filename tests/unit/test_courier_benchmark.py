"""benchmarks/courier.py: the arms' image tables and one small end-to-end run of the harness."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_posters  # tests/ is on sys.path

from benchmarks import courier, ledger
from benchmarks.courier import ARMS, COMPARISONS, markdown, pca_rows, permuted_rows, run_arms, summarise
from marn.config import load_config
from marn.data.schema import COURIER_EMBEDDINGS, read_dataset
from marn.data.synth import synthesize

COURIER = {"dim": 8, "hidden": 16, "history": 6, "min_history": 2, "negatives": 16, "batch_size": 64}


def _vectors(rows=30, width=12, empty=(0, 7)):
    image = np.random.default_rng(3).normal(size=(rows, width)).astype(np.float32)
    image[list(empty)] = 0.0  # items without a poster
    return image


def test_pca_keeps_distances_at_full_size_and_orders_the_variance():
    image = _vectors()
    has = np.abs(image).sum(1) > 0
    full = pca_rows(image, image.shape[1])
    assert not full[~has].any()  # no poster: still zeros
    distance = lambda x: np.linalg.norm(x[has][:, None] - x[has][None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(distance(full), distance(image), atol=1e-4)  # a rotation of the centred rows
    reduced = pca_rows(image, 4)
    assert reduced.shape == (30, 4) and reduced.dtype == np.float32
    variance = reduced[has].var(0)
    assert np.all(np.diff(variance) <= 1e-6) and variance[0] > variance[-1]
    np.testing.assert_allclose(reduced[has].mean(0), 0.0, atol=1e-5)


def test_permutation_moves_each_poster_to_another_item_and_keeps_the_empty_rows():
    image = _vectors()
    has = np.abs(image).sum(1) > 0
    moved = permuted_rows(image, seed=1)
    assert not moved[~has].any()
    assert sorted(map(tuple, moved[has])) == sorted(map(tuple, image[has]))  # the same vectors
    assert (moved[has] != image[has]).any(1).mean() > 0.8  # most items got another item's vector
    np.testing.assert_array_equal(moved, permuted_rows(image, seed=1))
    assert not np.array_equal(moved, permuted_rows(image, seed=2))


@pytest.fixture(scope="module")
def poster_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("courier-bench")
    cfg = load_config(None, {"synth": {"users": 120, "items": 60, "events_per_user": 10, "seed": 5}})
    synthesize(root, cfg.synth)
    write_posters(root, read_dataset(root))
    return root


def test_the_harness_trains_every_arm_per_seed_and_pairs_them(poster_world, tmp_path):
    cfg = load_config(
        None,
        {
            "samples": {"max_history": 8},
            "train": {"epochs": 1, "batch_size": 64},
            "model": TINY_MODEL,
            "embed": {"courier": {**COURIER, "epochs": 1}},
        },
    )
    work = tmp_path / "work"
    runs = run_arms(poster_world, cfg, work, [1, 2], list(ARMS), ["din"])
    assert set(runs["din"]) == set(ARMS) and all(set(by_seed) == {1, 2} for by_seed in runs["din"].values())
    for seed in (1, 2):  # one COURIER head per seed, trained beside links to the dataset's files
        table = work / "courier" / f"seed-{seed}" / COURIER_EMBEDDINGS
        assert table.exists() and not table.is_symlink()
        assert not (poster_world / COURIER_EMBEDDINGS).exists()  # the dataset itself is left alone
    aucs = {arm: [runs["din"][arm][s]["auc"] for s in (1, 2)] for arm in ARMS}
    assert len({tuple(v) for v in aucs.values()}) == len(ARMS)  # four different image tables
    summary = summarise(runs, work, "python -m benchmarks.courier ...")
    comparisons = summary["models"]["din"]["comparisons"]
    assert [(c["arm"], c["reference"]) for c in comparisons] == list(COMPARISONS)
    for c in comparisons:
        a, r = aucs[c["arm"]], aucs[c["reference"]]
        assert c["deltas"] == pytest.approx([a[0] - r[0], a[1] - r[1]])
        low, high = c["ci95"]
        assert low <= c["mean"] <= high and c["gain"] == (low > 0)
    assert set(summary["courier"]) == {"seed-1", "seed-2"}
    one_seed = {"din": {arm: {1: by_seed[1]} for arm, by_seed in runs["din"].items()}}
    assert set(summarise(one_seed, work, "...")["courier"]) == {"seed-1"}  # only the heads of these runs
    no_head = {"din": {arm: runs["din"][arm] for arm in ("imagenet", "imagenet_pca")}}
    assert summarise(no_head, work, "...")["courier"] == {}
    for arm in ARMS:  # each run says what it trained: the arm, and the head's method and seed
        run = work / "din" / arm / "seed-2"
        assert json.loads((run / "metrics.json").read_text())["arm"] == arm == runs["din"][arm][2]["arm"]
        embed = torch.load(run / "model.pt", weights_only=False)["config"]["embed"]
        courier_arm = arm in ("courier", "courier_permuted")
        assert embed["method"] == ("courier" if courier_arm else "imagenet")
        assert embed["courier"]["seed"] == (2 if courier_arm else 7)
    text = markdown(summary)
    assert "courier - imagenet_pca" in text and "recall@20" in text
    json.dumps(summary)  # the results file is plain JSON
    stamp = (work / "din" / "courier" / "seed-1" / "metrics.json").stat().st_mtime_ns
    again = run_arms(poster_world, cfg, work, [1], ["courier"], ["din"])  # finished runs are read back
    assert again["din"]["courier"][1] == runs["din"]["courier"][1]
    assert (work / "din" / "courier" / "seed-1" / "metrics.json").stat().st_mtime_ns == stamp
    # Another machine: a ledger of the first WORK restored into an empty one trains nothing again, and a new
    # model's courier arm reads the restored head's table through links made again (benchmarks/ledger.py).
    book, elsewhere = tmp_path / "ledger", tmp_path / "elsewhere"
    assert ledger.save(courier.LEDGER, work, book, poster_world)
    ledger.restore(courier.LEDGER, book, elsewhere, poster_world)
    trained = []
    restored = run_arms(
        poster_world, cfg, elsewhere, [1, 2], list(ARMS), ["din"], on_finished=lambda: trained.append(1)
    )
    assert trained == [] and restored == runs
    table = elsewhere / "courier" / "seed-1" / COURIER_EMBEDDINGS
    stamp = table.stat().st_mtime_ns
    run_arms(poster_world, cfg, elsewhere, [1], ["courier"], ["lr"], on_finished=lambda: trained.append(1))
    assert trained == [1] and table.stat().st_mtime_ns == stamp  # the restored head, not a new one
    assert (elsewhere / "courier" / "seed-1" / "events.parquet").is_symlink()
    refused = r"(?s)config\.train\.epochs: 1 -> 2.*another --work"  # WORK is claimed for one config
    with pytest.raises(ValueError, match=refused):
        run_arms(poster_world, cfg.with_overrides({"train.epochs": 2}), work, [1], ["courier"], ["din"])
