"""Point-in-time item statistics (the paper's "statistic" modality: historical exposure, clicks, orders).

Counts change over time, so they are kept as daily snapshots: the row (item, ts=day D 00:00 UTC) holds
cumulative counts over events strictly before D. A sample at time t reads, for its candidate and for every
item of its history, the newest snapshot stamped strictly before t (:func:`stats_before`), so no input of a
sample counts its own event, anything at the same instant, or anything later. Feast's item_stats view
serves the same table (``marn.features``) with the same guarantee; serving reads its newest row.

:func:`item_stat_table` is the one source of these values for every path (the Feast tables, the local
samples and serving). :class:`StatDiscretizer` turns them into the paper's two bucket codes per statistic
with boundaries fitted on the training split only and stored with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from marn.data.schema import item_stat_columns

if TYPE_CHECKING:
    from marn.data.schema import Dataset

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


def earliest_time(dataset: Dataset) -> pd.Timestamp:
    """The dataset's first instant (events, items' first_seen): static rows are stamped with it, so every
    point-in-time join finds them, and the zero row of :func:`item_stat_table` starts there."""
    times = [pd.to_datetime(dataset.events["ts"], utc=True).min()]
    if "first_seen" in dataset.items.columns:
        times.append(pd.to_datetime(dataset.items["first_seen"], utc=True).min())
    return min(t for t in times if not pd.isna(t)).as_unit("us")


def item_stat_table(dataset: Dataset, static_ts: pd.Timestamp) -> pd.DataFrame:
    """Every item's statistic rows: a zero row at ``static_ts`` (nothing counted yet), then the daily
    snapshots (the dataset's ``item_stats`` when it has them, else counted from its events), each row with
    the item's static numeric columns (price, runtime, ...). Columns: item_id, ts, n_* counts, statics.

    This is the table Feast's item_stats view serves and the local path reads: one truth for both.
    """
    snapshots = dataset.item_stats if dataset.item_stats is not None else daily_item_stats(dataset.events)
    snapshots = snapshots.assign(ts=pd.to_datetime(snapshots["ts"], utc=True).dt.as_unit("us"))
    counts = [c for c in snapshots.columns if c.startswith(STAT_PREFIX)]
    items = dataset.items.drop_duplicates("item_id")
    static = item_stat_columns(items)
    clash = sorted(set(static) & set(counts))
    if clash:
        raise ValueError(f"items.parquet columns {clash} clash with item_stats count names")
    zeros = pd.DataFrame({"item_id": items["item_id"].astype(str).to_numpy(), "ts": static_ts.as_unit("us")})
    zeros[counts] = 0
    rows = pd.concat([zeros, snapshots[["item_id", "ts", *counts]]], ignore_index=True)
    rows["item_id"] = rows["item_id"].astype(str)
    rows = rows.drop_duplicates(["item_id", "ts"], keep="last")  # a snapshot at static_ts wins over zeros
    rows[counts] = rows[counts].fillna(0).astype(np.int64)
    statics = items[["item_id", *static]].astype({"item_id": str})
    for name in static:
        statics[name] = pd.to_numeric(statics[name], errors="coerce").astype(np.float64)
    rows = rows.merge(statics, on="item_id", how="left")
    return rows.sort_values(["item_id", "ts"], kind="stable").reset_index(drop=True)


def stat_names(table: pd.DataFrame) -> list[str]:
    """The statistic columns of an :func:`item_stat_table`, in column order."""
    return [c for c in table.columns if c not in ("item_id", "ts")]


def snapshot_slots(moments: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index into the sorted snapshot ``moments`` of the newest one strictly before each time; -1 when
    none is. No snapshot of any item lies between that moment and t, so as of it (inclusive) every item's
    newest row is its newest before t: the key both the local path and the Feast join look up."""
    return np.searchsorted(moments, times, side="left") - 1


def stats_before(table: pd.DataFrame, item_ids: Any, times: Any) -> np.ndarray:
    """Each (item, t)'s statistics from the newest row of ``table`` stamped strictly before t.

    Returns (n, F) float64 in :func:`stat_names` order: counts 0 and statics NaN where the item has no such
    row (an item unknown to the table, or a time before its first row). Computed on the distinct
    (item, newest snapshot time before t) pairs, so millions of history positions cost a few joins.
    """
    names = stat_names(table)
    items = np.asarray(item_ids, dtype=object).astype(str)
    t = pd.to_datetime(pd.Series(np.asarray(times)), utc=True).dt.as_unit("us").to_numpy()
    out = np.full((len(items), len(names)), np.nan)
    counts = np.array([n.startswith(STAT_PREFIX) for n in names], dtype=bool)
    out[:, counts] = 0.0
    if len(items) == 0 or table.empty:
        return out
    snap_ts = pd.to_datetime(table["ts"], utc=True).dt.as_unit("us").to_numpy()
    # Keys (item, newest snapshot moment before t) repeat far more than (item, t).
    moments = np.unique(snap_ts)
    slot = snapshot_slots(moments, t)
    keys = pd.DataFrame({"item_id": items, "slot": slot})
    distinct = keys[keys["slot"] >= 0].drop_duplicates(ignore_index=True)
    if distinct.empty:
        return out
    distinct["ts"] = moments[distinct["slot"].to_numpy()]
    right = table.assign(ts=snap_ts).sort_values("ts", kind="stable")
    found = pd.merge_asof(
        distinct.sort_values("ts", kind="stable"), right, on="ts", by="item_id", direction="backward"
    )
    found = keys.merge(found.drop(columns="ts"), on=["item_id", "slot"], how="left")
    values = found[names].to_numpy(dtype=np.float64)
    values[:, counts] = np.nan_to_num(values[:, counts], nan=0.0)
    return values


def stats_as_of(item_stats: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """The newest snapshot at or before each (item_id, ts) row of ``keys``; zeros where none exists.

    Returns a frame aligned with ``keys`` (same index order) holding only the statistic columns. A snapshot
    stamped exactly t counts only events before t, so including it is still point-in-time.
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
        allow_exact_matches=True,
    )
    merged = merged.sort_values("_row")
    out = merged[stat_cols].fillna(0).astype(np.int64)
    out.index = keys.index
    return out


@dataclass(frozen=True)
class StatDiscretizer:
    """Multi-granularity discretisation (paper 3.1.1, after AutoCross [37]): each statistic becomes a code
    1..b for each granularity b (10 and 100), 0 = missing.

    The boundaries are equal-frequency over the *distinct item states of the training split* (one value per
    item and snapshot that a training sample reads), the paper's "according to the number of items" with
    time added. Fitted on training samples only and saved with the model, so evaluation and serving bucket
    every later value with the same boundaries.
    """

    names: tuple[str, ...]
    buckets: tuple[int, ...]
    edges: tuple[tuple[tuple[float, ...], ...], ...]  # [stat][granularity] -> sorted inner boundaries

    @classmethod
    def fit(
        cls, names: Sequence[str], values: np.ndarray, buckets: Sequence[int] = (10, 100)
    ) -> StatDiscretizer:
        """``values`` (n, F): one row per distinct training item state, columns in ``names`` order."""
        values = np.asarray(values, dtype=np.float64).reshape(len(values), len(names))
        if any(b < 1 or b > 32_000 for b in buckets):
            raise ValueError(f"bucket counts must lie in [1, 32000], got {tuple(buckets)}")
        edges = []
        for j in range(len(names)):
            column = values[:, j][~np.isnan(values[:, j])]
            per_stat = []
            for b in buckets:
                if len(column) == 0 or b == 1:
                    per_stat.append(())
                    continue
                inner = np.quantile(column, np.arange(1, b) / b, method="lower")
                per_stat.append(tuple(float(v) for v in inner))
            edges.append(tuple(per_stat))
        return cls(tuple(names), tuple(int(b) for b in buckets), tuple(edges))

    @property
    def n_stats(self) -> int:
        return len(self.names)

    def transform(self, values: np.ndarray) -> np.ndarray:
        """(..., F) raw values in ``names`` order -> (..., F, G) int16 codes 1..b per granularity, 0 = NaN.

        A value v gets 1 + the number of boundaries below it: bucket k holds (boundary k-1, boundary k], the
        boundaries being training values, values past the training range take the last code.
        """
        values = np.asarray(values, dtype=np.float64)
        if values.shape[-1] != self.n_stats:
            raise ValueError(f"expected {self.n_stats} statistics {self.names}, got {values.shape[-1]}")
        out = np.zeros((*values.shape, len(self.buckets)), dtype=np.int16)
        present = ~np.isnan(values)
        for j in range(self.n_stats):
            v = values[..., j]
            for g, inner in enumerate(self.edges[j]):
                codes = 1 + np.searchsorted(np.asarray(inner, dtype=np.float64), v, side="left")
                out[..., j, g] = np.where(present[..., j], codes, 0)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "names": list(self.names),
            "buckets": list(self.buckets),
            "edges": [[list(e) for e in per_stat] for per_stat in self.edges],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StatDiscretizer:
        return cls(
            tuple(data["names"]),
            tuple(int(b) for b in data["buckets"]),
            tuple(tuple(tuple(float(v) for v in e) for e in per_stat) for per_stat in data["edges"]),
        )
