"""Import of the real MovieLens 100K data (read from the shared folder, never copied into the repo)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from marn.config import load_config
from marn.data.item_features import build_item_features
from marn.data.movielens import import_movielens
from marn.data.schema import Dataset, read_dataset, resolve_image_uri
from marn.data.tensors import ItemCatalog
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
    features = build_item_features(subset, ItemCatalog.from_items(items), base.features)  # posters read once
    for name in model_names():
        cfg = load_config(None, {**small, "train": {"model": name, "epochs": 1, "batch_size": 512}})
        result = train_model(subset, cfg, tmp_path / name, show_progress=False, features=features)
        metrics = json.loads(result.metrics_path.read_text())
        assert 0.0 <= metrics["auc"] <= 1.0 and metrics["logloss"] > 0, name
        assert len(metrics["auc_by_popularity"]) == 10 and result.checkpoint.exists(), name
