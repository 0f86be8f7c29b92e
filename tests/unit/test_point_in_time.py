"""No input of a sample may be computed from its own event or anything later (docs/design.md, point-in-time).

These tests failed on the static per-item counts that came before point-in-time statistics; keep them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from marn.config import SamplesConfig, load_config
from marn.data.samples import HIST_STAT_COLUMN, SPLITS, STAT_COLUMN, build_samples, sample_stat_names
from marn.data.schema import Dataset, read_dataset
from marn.data.stats import StatDiscretizer, daily_item_stats, earliest_time, item_stat_table, stats_before
from marn.data.synth import synthesize
from marn.data.tensors import ItemCatalog, encode_samples, fit_statistics
from marn.evaluate import auc
from marn.train import train_model

CFG = SamplesConfig(max_history=8, min_events=4, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("pit")
    cfg = load_config(None, {"synth": {"users": 120, "items": 60, "events_per_user": 10, "seed": 5}})
    synthesize(root, cfg.synth)
    return read_dataset(root)


def with_events(dataset: Dataset, extra: pd.DataFrame) -> Dataset:
    """The dataset plus ``extra`` events, its item_stats recounted from all events (as an importer does)."""
    events = pd.concat([dataset.events, extra], ignore_index=True)
    return replace(dataset, events=events, item_stats=daily_item_stats(events))


def outside_clicks(
    dataset: Dataset, start: pd.Timestamp, items: list[str], per_user: int = 3
) -> pd.DataFrame:
    """New users who each click ``per_user`` (< min_events) of ``items`` from ``start`` on, an hour apart."""
    rows = []
    for k in range(0, len(items), per_user):
        for j, item in enumerate(items[k : k + per_user]):
            rows.append((f"outsider-{k}", item, "click", start + pd.Timedelta(hours=j)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "behavior", "ts"])


def encoded(dataset: Dataset):
    samples = build_samples(dataset, CFG)
    statistics = fit_statistics(samples.train, (10, 100))
    catalog = ItemCatalog.from_items(dataset.items)
    return samples, statistics, {s: encode_samples(samples.split(s), catalog, 8, statistics) for s in SPLITS}


def test_events_after_every_real_event_change_no_tensor_of_any_real_sample(world):
    """The outside check: new users clicking half the catalogue after the last real event."""
    last = pd.to_datetime(world.events["ts"], utc=True).max()
    items = sorted(world.items["item_id"].astype(str))[::2]
    future = with_events(world, outside_clicks(world, last + pd.Timedelta(days=2), items))
    before_samples, before_stats, before = encoded(replace(world, item_stats=daily_item_stats(world.events)))
    after_samples, after_stats, after = encoded(future)
    assert after_stats == before_stats  # the bucket boundaries too: fitted on training samples only
    for split in before:
        assert before_samples.split(split).equals(after_samples.split(split)), split
        for name, tensor in before[split].tensors.items():
            assert torch.equal(tensor, after[split].tensors[name]), (split, name)


def test_seeded_training_gives_identical_test_metrics_with_events_after_every_real_event(world, tmp_path):
    last = pd.to_datetime(world.events["ts"], utc=True).max()
    half = sorted(world.items["item_id"].astype(str))[::2]  # half the catalogue, each clicked 3 times
    future = with_events(world, outside_clicks(world, last + pd.Timedelta(days=1), half * 3))
    settings = {
        "samples": {"max_history": 8},
        "train": {"model": "din", "epochs": 1, "batch_size": 128, "seed": 2},
        "features": {"image": "pixels", "image_pixels": 4, "title_len": 6},
        "model": {"modality_dim": 8, "rep_dim": 8, "sequence_dim": 8, "title_filters": 2, "hidden": [8]},
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads may reorder float sums
    try:
        runs = [
            train_model(data, load_config(None, settings), tmp_path / name, show_progress=False).metrics
            for name, data in (
                ("real", replace(world, item_stats=daily_item_stats(world.events))),
                ("plus", future),
            )
        ]
    finally:
        torch.set_num_threads(threads)
    for key in ("auc", "user_auc", "logloss", "auc_by_popularity", "unseen_recall", "valid"):
        assert runs[0][key] == runs[1][key], key


def test_a_popularity_explosion_after_the_cut_is_invisible_before_it(world):
    """Some items explode in popularity after a cut: no sample before the cut may see it, in its candidate's
    statistics or its history items' ones, so a ranker by the samples' counts ranks them as before."""
    times = pd.to_datetime(world.events["ts"], utc=True)
    cut = times.quantile(0.5).floor("D")
    hot = sorted(world.items["item_id"].astype(str))[:6]
    burst = outside_clicks(world, cut, hot * 20, per_user=3)  # 120 clicks on 6 items from the cut on
    plain = build_samples(replace(world, item_stats=daily_item_stats(world.events)), CFG)
    exploded = build_samples(with_events(world, burst), CFG)
    names = sample_stat_names(plain.train)
    assert "n_events" in names
    saw_burst = False
    for split in ("train", "valid", "test"):
        a, b = plain.split(split).to_pandas(), exploded.split(split).to_pandas()
        before = (a["ts"] <= cut).to_numpy()
        assert before.any(), split
        for name in names:
            for column in (STAT_COLUMN.format(name), HIST_STAT_COLUMN.format(name)):
                assert same_values(a.loc[before, column], b.loc[before, column]), column
        # after the cut the burst shows: the test would notice counts that ignored time altogether
        later = ~before & a["item_id"].isin(hot).to_numpy()
        saw_burst |= bool((b.loc[later, "stat_n_events"] > a.loc[later, "stat_n_events"]).any())
        # the popularity-only ranking of the samples before the cut is the same with and without the burst
        label = a.loc[before, "label"].to_numpy()
        if 0 < label.sum() < len(label):
            assert auc(label, a.loc[before, "stat_n_events"].to_numpy()) == auc(
                label, b.loc[before, "stat_n_events"].to_numpy()
            )
    assert saw_burst


def test_statistics_count_only_events_before_the_snapshot_the_sample_reads(world):
    """A plain pandas count of the raw events (strictly before the newest midnight before t) for every
    candidate and history entry equals what the samples carry and what the model receives."""
    samples = build_samples(world, CFG)
    statistics = fit_statistics(samples.train, (10, 100))
    catalog = ItemCatalog.from_items(world.items)
    events = world.events.assign(ts=pd.to_datetime(world.events["ts"], utc=True))
    for split in ("train", "test"):
        table = samples.split(split)
        rows = table.to_pandas()
        expected = naive_counts(events, rows["item_id"], rows["ts"])
        np.testing.assert_array_equal(rows["stat_n_events"].to_numpy(), expected)
        lengths = rows["hist_item_ids"].map(len).to_numpy()
        hist_items = np.concatenate(rows["hist_item_ids"].to_numpy())
        hist_times = np.repeat(rows["ts"].to_numpy(), lengths)
        got = np.concatenate([np.asarray(v) for v in rows["hist_stat_n_events"]])
        np.testing.assert_array_equal(got, naive_counts(events, hist_items, hist_times))
        # what the model receives: the same values, bucketed with the training split's boundaries
        data = encode_samples(table, catalog, 8, statistics)
        j = statistics.names.index("n_events")
        codes = statistics.transform(rows[[STAT_COLUMN.format(n) for n in statistics.names]].to_numpy(float))
        assert np.array_equal(data.tensors["item_stats"].numpy(), codes)
        assert np.array_equal(
            data.tensors["item_stats"][:, j].numpy(),
            statistics.transform(
                np.stack(
                    [expected if n == "n_events" else rows[STAT_COLUMN.format(n)] for n in statistics.names],
                    1,
                )
            )[:, j],
        )


def same_values(x: pd.Series, y: pd.Series) -> bool:
    """Equal scalars or lists, NaN equal to NaN."""

    def flat(series: pd.Series) -> tuple[np.ndarray, list[int]]:
        rows = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in series]
        return (np.concatenate(rows) if rows else np.zeros(0)), [len(r) for r in rows]

    (xv, xl), (yv, yl) = flat(x), flat(y)
    return xl == yl and np.array_equal(xv, yv, equal_nan=True)


def naive_counts(events: pd.DataFrame, items, times) -> np.ndarray:
    """Events of each item strictly before the newest midnight strictly before t (the daily snapshot a
    sample at t reads), counted one (item, t) at a time."""
    out = []
    naive = events["ts"].dt.tz_convert(None).to_numpy().astype("datetime64[us]")
    by_item = {item: naive[index] for item, index in events.groupby("item_id").indices.items()}
    for item, t in zip(items, pd.to_datetime(pd.Series(times), utc=True), strict=True):
        snapshot = (t - pd.Timedelta(microseconds=1)).floor("D")
        out.append(
            int(
                (
                    by_item.get(item, np.array([], dtype="datetime64[us]"))
                    < snapshot.tz_convert(None).to_datetime64()
                ).sum()
            )
        )
    return np.asarray(out, dtype=np.float64)


def test_an_item_first_seen_after_the_training_cut_has_zero_counts_until_its_first_event(world):
    start = pd.to_datetime(world.events["ts"], utc=True).max() + pd.Timedelta(days=3)
    table = item_stat_table(world, earliest_time(world))
    before = stats_before(table, ["brand-new"], [start])
    assert before[0, 0] == 0  # unknown to the table: nothing counted
    items = world.items["item_id"].astype(str)
    quiet = items[~items.isin(world.events["item_id"].astype(str))]
    if len(quiet):
        assert (
            stats_before(table, quiet.to_numpy(), np.repeat(start.to_datetime64(), len(quiet)))[:, 0] == 0
        ).all()


def test_the_discretizer_buckets_later_values_with_training_boundaries():
    statistics = StatDiscretizer.fit(
        ["n_events", "price"], np.array([[0, 1.0], [1, 2.0], [5, np.nan], [9, 3.0]]), (2, 4)
    )
    codes = statistics.transform(np.array([[100.0, np.nan], [0.0, 2.5]]))  # (2, F=2, G=2)
    assert codes[0, 0].tolist() == [2, 4]  # past the training range: the last bucket
    assert codes[0, 1].tolist() == [0, 0]  # missing
    assert codes[1, 0].tolist() == [1, 1]
    assert StatDiscretizer.from_dict(statistics.to_dict()) == statistics
    with pytest.raises(ValueError, match="expected 2 statistics"):
        statistics.transform(np.zeros((1, 3)))
