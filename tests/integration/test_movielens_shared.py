"""Import of the real MovieLens 100K data (read from the shared folder, never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from marn.data.movielens import import_movielens
from marn.data.schema import read_dataset, resolve_image_uri


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
