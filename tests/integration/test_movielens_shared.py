"""Import of the real MovieLens 100K data (read from the shared folder, never copied into the repo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from marn.config import load_config
from marn.data.item_features import build_item_features
from marn.data.movielens import import_movielens
from marn.data.samples import HIST_STAT_COLUMN, STAT_COLUMN, build_samples
from marn.data.schema import Dataset, read_dataset, resolve_image_uri
from marn.data.tensors import ItemCatalog, encode_samples, fit_statistics
from marn.models import model_names
from marn.train import train_model


@pytest.mark.slow
def test_import_real_movielens_100k(shared_dir: Path, tmp_path: Path) -> None:
    src = shared_dir / "datasets" / "movielens-100k"
    media = shared_dir / "datasets" / "movielens-100k-media"
    for path in (src, media):
        if not path.is_dir():
            pytest.skip(f"MovieLens data not found at {path}; set MARN_SHARED_DIR")

    summary = import_movielens(src, tmp_path, media=media)

    counts = (summary.events, summary.users, summary.items, summary.items_with_image)
    assert counts == (100_000, 943, 1682, 1663)
    data = read_dataset(tmp_path)
    assert len(data.events) == 100_000 and data.events["user_id"].nunique() == 943
    assert len(data.items) == 1682 and len(data.users) == 943
    with_image = data.items["image_uri"].dropna()
    assert len(with_image) == 1663
    assert all(resolve_image_uri(tmp_path, uri).is_file() for uri in with_image)
    assert data.events["ts"].min() >= pd.Timestamp("1997-09-01", tz="UTC")
    assert data.events["ts"].max() < pd.Timestamp("1998-05-01", tz="UTC")
    assert data.items["first_seen"].notna().all()
    assert not [c for c in data.items.columns if "vote" in c]
    # Point-in-time statistics: at most the events strictly before each snapshot day.
    last = data.item_stats.groupby("item_id")["n_events"].max()
    assert (last == data.events.groupby("item_id").size().reindex(last.index)).all()


@pytest.mark.slow
def test_every_registered_model_trains_on_real_movielens(shared_dir: Path, tmp_path: Path) -> None:
    """Real posters, long plot texts and sparse statistics through every model: 40 users, one epoch each.

    The full-data run of every model is benchmarks/model_quality.py (see benchmarks/README.md)."""
    src = shared_dir / "datasets" / "movielens-100k"
    media = shared_dir / "datasets" / "movielens-100k-media"
    if not src.is_dir() or not media.is_dir():
        pytest.skip(f"MovieLens data not found under {shared_dir}; set MARN_SHARED_DIR")
    import_movielens(src, tmp_path / "ml", media=media)
    full = read_dataset(tmp_path / "ml")
    users = sorted(full.events["user_id"].unique())[:40]
    events = full.events[full.events["user_id"].isin(users)]
    items = full.items[full.items["item_id"].isin(events["item_id"])]
    subset = Dataset(events=events, items=items, root=full.root)
    small = {"samples": {"max_history": 20}, "features": {"title_len": 24}}
    base = load_config(None, small)
    samples = build_samples(subset, base.samples)
    statistics = fit_statistics(samples.train, base.model.stats_buckets)
    catalog = ItemCatalog.from_items(items)
    features = build_item_features(subset, catalog, base.features, statistics)  # posters read once
    for name in model_names():
        cfg = load_config(None, {**small, "train": {"model": name, "epochs": 1, "batch_size": 512}})
        result = train_model(
            subset, cfg, tmp_path / name, show_progress=False, features=features, samples=samples
        )
        metrics = json.loads(result.metrics_path.read_text())
        assert 0.0 <= metrics["auc"] <= 1.0 and metrics["logloss"] > 0, name
        assert len(metrics["auc_by_popularity"]) == 10 and result.checkpoint.exists(), name


@pytest.mark.slow
def test_every_sample_statistic_equals_a_plain_count_of_earlier_events(
    shared_dir: Path, tmp_path: Path
) -> None:
    """The point-in-time rule on the real data: for every sample of every split, the count of its candidate
    and of each history item equals the raw events of that item before the snapshot the sample reads (the
    newest midnight strictly before the sample's time), and the model receives exactly those values in
    buckets. On static counts over the log 42% of a test positive's count came from the future."""
    src = shared_dir / "datasets" / "movielens-100k"
    if not src.is_dir():
        pytest.skip(f"MovieLens data not found under {shared_dir}; set MARN_SHARED_DIR")
    import_movielens(src, tmp_path / "ml")
    data = read_dataset(tmp_path / "ml")
    cfg = load_config(None, {"samples": {"max_history": 20}})
    samples = build_samples(data, cfg.samples)
    statistics = fit_statistics(samples.train, cfg.model.stats_buckets)
    catalog = ItemCatalog.from_items(data.items)
    events = data.events.assign(ts=pd.to_datetime(data.events["ts"], utc=True))
    times_by_item = {
        item: np.sort(group["ts"].dt.tz_convert(None).to_numpy().astype("datetime64[us]"))
        for item, group in events.groupby("item_id")
    }

    def plain_counts(items: np.ndarray, times: pd.Series) -> np.ndarray:
        snapshot = (pd.to_datetime(times, utc=True) - pd.Timedelta(microseconds=1)).dt.floor("D")
        cut = snapshot.dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        out = np.zeros(len(items))
        frame = pd.DataFrame({"item": items, "cut": cut})
        for item, rows in frame.groupby("item").indices.items():
            out[rows] = np.searchsorted(times_by_item.get(item, cut[:0]), cut[rows], side="left")
        return out

    j = statistics.names.index("n_events")
    for split in ("train", "valid", "test"):
        table = samples.split(split)
        rows = table.select(["item_id", "ts", "hist_item_ids"]).to_pandas()
        expected = plain_counts(rows["item_id"].to_numpy(), rows["ts"])
        np.testing.assert_array_equal(table.column(STAT_COLUMN.format("n_events")).to_numpy(), expected)
        lengths = rows["hist_item_ids"].map(len).to_numpy()
        hist_expected = plain_counts(
            np.concatenate(rows["hist_item_ids"].to_numpy()), rows["ts"].repeat(lengths)
        )
        hist_got = table.column(HIST_STAT_COLUMN.format("n_events")).combine_chunks().flatten().to_numpy()
        np.testing.assert_array_equal(hist_got, hist_expected)
        # a literal pandas filter on a few rows, beside the vectorised count
        for k in np.random.default_rng(0).choice(len(rows), size=50, replace=False):
            snapshot = (rows["ts"].iloc[k] - pd.Timedelta(microseconds=1)).floor("D")
            mine = events[(events["item_id"] == rows["item_id"].iloc[k]) & (events["ts"] < snapshot)]
            assert len(mine) == expected[k]
        # what the model receives: the candidate's counts in the training split's buckets
        received = encode_samples(table, catalog, 20, statistics).tensors["item_stats"][:, j].numpy()
        values = np.zeros((len(expected), statistics.n_stats))
        values[:, j] = expected
        np.testing.assert_array_equal(received, statistics.transform(values)[:, j])
