"""Point-in-time item statistics (the paper's "statistic" modality: historical exposure, clicks, orders).

Counts change over time, so they are kept as daily snapshots: the row (item, ts=day D 00:00 UTC) holds
cumulative counts over events strictly before D. A sample at time t reads the newest snapshot with
ts <= t (``stats_as_of``), so it never sees its own day's or any later event. This is the shape Feast's
timestamped item-statistics view serves with the same guarantee.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STAT_PREFIX = "n_"  # n_events, n_click, n_rating, ...


def daily_item_stats(events: pd.DataFrame) -> pd.DataFrame:
    """Daily cumulative behaviour counts per item from ``events`` (canonical columns).

    Returns columns item_id, ts, n_events and one n_<behavior> per behaviour present. A snapshot exists
    for every item on each day after a day on which it had events.
    """
    if events.empty:
        return pd.DataFrame({"item_id": pd.Series(dtype=str), "ts": pd.Series(dtype="datetime64[us, UTC]")})
    day = pd.to_datetime(events["ts"], utc=True).dt.floor("D")
    counts = (
        pd.DataFrame({"item_id": events["item_id"].to_numpy(), "day": day, "behavior": events["behavior"]})
        .groupby(["item_id", "day", "behavior"], observed=True)
        .size()
        .unstack("behavior", fill_value=0)
        .sort_index()
    )
    counts.columns = [f"{STAT_PREFIX}{b}" for b in counts.columns]
    counts.insert(0, f"{STAT_PREFIX}events", counts.sum(axis=1))
    cumulative = counts.groupby(level="item_id").cumsum().astype(np.int64)
    out = cumulative.reset_index()
    # Counts through the end of day D become visible at D + 1 day, 00:00.
    out["ts"] = (out.pop("day") + pd.Timedelta(days=1)).dt.as_unit("us")
    return out[["item_id", "ts", *cumulative.columns]]


def stats_as_of(item_stats: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """The newest snapshot at or before each (item_id, ts) row of ``keys``; zeros where none exists.

    Returns a frame aligned with ``keys`` (same index order) holding only the statistic columns.
    """
    stat_cols = [c for c in item_stats.columns if c not in ("item_id", "ts")]
    left = keys[["item_id", "ts"]].copy()
    left["ts"] = pd.to_datetime(left["ts"], utc=True).dt.as_unit("us")
    left["_row"] = np.arange(len(left))
    right = item_stats.copy()
    right["ts"] = pd.to_datetime(right["ts"], utc=True).dt.as_unit("us")
    merged = pd.merge_asof(
        left.sort_values("ts"),
        right.sort_values("ts"),
        on="ts",
        by="item_id",
        direction="backward",
        allow_exact_matches=True,  # a snapshot stamped exactly at t only holds events before t
    )
    merged = merged.sort_values("_row")
    out = merged[stat_cols].fillna(0).astype(np.int64)
    out.index = keys.index
    return out
