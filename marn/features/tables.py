"""The offline feature tables: one parquet file per feature view (the file sources of Feast's dask offline
store), their names and columns. See :mod:`marn.features` for the views and the point-in-time rules."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from marn.config import Config
from marn.data.samples import concatenated_ranges
from marn.data.schema import IMAGE_EMBEDDINGS, TITLE_EMBEDDINGS, TS, Dataset
from marn.data.stats import STAT_PREFIX, earliest_time, item_stat_table, stat_names
from marn.data.text.tokenize import tokenize_titles

TIMESTAMP = "event_timestamp"  # every table's row time; Feast's default entity-frame column name

USER_SEQUENCES = "user_sequences"
ITEM_ATTRIBUTES = "item_attributes"
ITEM_STATS = "item_stats"
ITEM_EMBEDDINGS = "item_embeddings"
ITEM_REPRESENTATIONS = "item_representations"  # the prefix of the per-version views
VIEWS = (USER_SEQUENCES, ITEM_ATTRIBUTES, ITEM_STATS, ITEM_EMBEDDINGS)  # plus the representation views
REPRESENTATIONS_VIEW = re.compile(
    rf"^{ITEM_REPRESENTATIONS}_(?P<model>[a-z][a-z0-9_]*)_(?P<version>v\d{{4,}})$"
)
REQUIRED_VIEWS = (USER_SEQUENCES, ITEM_ATTRIBUTES, ITEM_STATS)

HISTORY_COLUMNS = ("hist_item_ids", "hist_behaviors", "hist_ts")  # user_sequences features = sample columns
SEQUENCE_TIME = "sequence_ts"  # a user_sequences row's own time: the key a point-in-time join returns
STATS_TIME = "stats_ts"  # the snapshot time, kept as a feature so a sample shows which snapshot it saw
EMBEDDING_COLUMNS = {IMAGE_EMBEDDINGS: "image_embedding", TITLE_EMBEDDINGS: "title_embedding"}
REP_COLUMN = "item_rep"


def table_path(tables_dir: str | Path, view: str) -> Path:
    if view not in VIEWS and not REPRESENTATIONS_VIEW.match(view):
        expected = f"one of {VIEWS} or {ITEM_REPRESENTATIONS}_<model>_<version>"
        raise ValueError(f"unknown feature view {view!r}; expected {expected}")
    return Path(tables_dir) / f"{view}.parquet"


def representations_view(model: str, version: str) -> str:
    """The feature view holding ``model``'s ``version`` (a registry version, v0001 ...) representations."""
    name = f"{ITEM_REPRESENTATIONS}_{model}_{version}"
    if not REPRESENTATIONS_VIEW.match(name):
        raise ValueError(f"model {model!r} / version {version!r} make no valid view name ({name!r})")
    return name


def representation_tables(tables_dir: str | Path) -> dict[str, Path]:
    """View name -> table of every published representation version in ``tables_dir``."""
    paths = sorted(Path(tables_dir).glob(f"{ITEM_REPRESENTATIONS}_*.parquet"))
    return {p.stem: p for p in paths if REPRESENTATIONS_VIEW.match(p.stem)}


def build_feature_tables(dataset: Dataset, cfg: Config, tables_dir: str | Path) -> dict[str, Path]:
    """Write one parquet table per feature view into ``tables_dir``; returns view name -> path.

    item_embeddings is written when the embed stage left its files in the dataset directory (and removed
    when they are gone); item representation tables written earlier (one per version) are kept and
    returned.
    """
    if dataset.events.empty:
        raise ValueError("no events: cannot build feature tables from an empty events table")
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    static_ts = earliest_time(dataset)
    tables = {
        USER_SEQUENCES: user_sequences(dataset.events, cfg.samples.max_history),
        ITEM_ATTRIBUTES: _item_attributes(dataset.items, static_ts),
        ITEM_STATS: _item_stats(dataset, static_ts),
    }
    embeddings = _item_embeddings(dataset.root, static_ts) if dataset.root is not None else None
    if embeddings is not None:
        tables[ITEM_EMBEDDINGS] = embeddings
    paths = {}
    for view, table in tables.items():
        paths[view] = table_path(tables_dir, view)
        pq.write_table(table, paths[view])
    if embeddings is None:
        table_path(tables_dir, ITEM_EMBEDDINGS).unlink(missing_ok=True)  # stale from an earlier dataset
    (tables_dir / f"{ITEM_REPRESENTATIONS}.parquet").unlink(missing_ok=True)  # unversioned: no model's
    paths.update(representation_tables(tables_dir))
    return paths


def user_sequences(events: pd.DataFrame, max_history: int) -> pa.Table:
    """One row per (user, distinct event time): the newest ``max_history`` behaviours up to and including
    that time, newest last. Events at one time keep file order (as in build_samples)."""
    if max_history < 1:
        raise ValueError(f"max_history must be at least 1, got {max_history}")
    if events.empty:
        raise ValueError("no events: cannot build user sequences from an empty events table")
    ordered = events.assign(_row=np.arange(len(events))).sort_values(["user_id", "ts", "_row"], kind="stable")
    users = ordered["user_id"].astype(str).to_numpy()
    items = ordered["item_id"].astype(str).to_numpy()
    behaviors = ordered["behavior"].astype(str).to_numpy()
    ts = pd.to_datetime(ordered["ts"], utc=True).dt.as_unit("us").dt.tz_localize(None).to_numpy()

    n = len(users)
    new_user = np.r_[True, users[1:] != users[:-1]]
    first_of_user = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    last_at_time = np.r_[(users[1:] != users[:-1]) | (ts[1:] != ts[:-1]), True]
    ends = np.flatnonzero(last_at_time) + 1  # exclusive end of each row's history
    starts = np.maximum(first_of_user[ends - 1], ends - max_history)
    lengths = ends - starts
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    index = np.repeat(starts, lengths) + concatenated_ranges(lengths)

    def history(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values[index], type=arrow_type))

    return pa.table(
        {
            "user_id": pa.array(users[ends - 1], pa.string()),
            TIMESTAMP: pa.array(ts[ends - 1], TS),
            SEQUENCE_TIME: pa.array(ts[ends - 1], TS),
            "hist_item_ids": history(items, pa.string()),
            "hist_behaviors": history(behaviors, pa.string()),
            "hist_ts": history(ts, TS),
        }
    )


def static_times(n: int, static_ts: pd.Timestamp) -> pa.Array:
    return pa.array(np.full(n, static_ts.tz_localize(None).to_datetime64()), TS)


def _strings(series: pd.Series) -> pa.Array:
    return pa.array(series.astype("string").astype(object).where(series.notna(), None), pa.string())


def _item_attributes(items: pd.DataFrame, static_ts: pd.Timestamp) -> pa.Table:
    items = items.drop_duplicates("item_id")
    first_seen = (
        items["first_seen"] if "first_seen" in items.columns else pd.Series(pd.NaT, index=items.index)
    )
    return pa.table(
        {
            "item_id": _strings(items["item_id"]),
            TIMESTAMP: static_times(len(items), static_ts),
            "category_id": _strings(items["category_id"]),
            "brand_id": _strings(items.get("brand_id", pd.Series(None, index=items.index))),
            "shop_id": _strings(items.get("shop_id", pd.Series(None, index=items.index))),
            "title_tokens": pa.array(
                tokenize_titles(items.get("title", pd.Series(None, index=items.index))), pa.list_(pa.string())
            ),
            "first_seen": pa.array(pd.to_datetime(first_seen, utc=True).dt.as_unit("us"), TS),
        }
    )


def _item_stats(dataset: Dataset, static_ts: pd.Timestamp) -> pa.Table:
    """:func:`marn.data.stats.item_stat_table` (a zero row per item at ``static_ts``, then the daily
    snapshots, with the static numeric columns) as the item_stats view's table."""
    rows = item_stat_table(dataset, static_ts)
    if STATS_TIME in rows.columns:
        raise ValueError(f"items.parquet column {STATS_TIME!r} clashes with the item_stats snapshot time")
    columns: dict[str, pa.Array] = {
        "item_id": pa.array(rows["item_id"], pa.string()),
        TIMESTAMP: pa.array(rows["ts"], TS),
        STATS_TIME: pa.array(rows["ts"], TS),
    }
    for name in stat_names(rows):
        if name.startswith(STAT_PREFIX):
            columns[name] = pa.array(rows[name].astype(np.int64), pa.int64())
        else:  # static columns: nullable, one type for all
            columns[name] = pa.array(rows[name].astype(np.float64), pa.float64())
    return pa.table(columns)


def _item_embeddings(data_dir: Path, static_ts: pd.Timestamp) -> pa.Table | None:
    """The embed stage's image and title vectors side by side; None when it wrote neither file. An item
    missing from one file (no readable image) gets a null vector there."""
    merged: pd.DataFrame | None = None
    for file, column in EMBEDDING_COLUMNS.items():
        path = Path(data_dir) / file
        if not path.exists():
            continue
        part = pq.read_table(path, columns=["item_id", "embedding"]).to_pandas()
        part = part.rename(columns={"embedding": column}).astype({"item_id": str})
        merged = part if merged is None else merged.merge(part, on="item_id", how="outer")
    if merged is None:
        return None
    merged = merged.sort_values("item_id", kind="stable")
    columns: dict[str, pa.Array] = {
        "item_id": pa.array(merged["item_id"], pa.string()),
        TIMESTAMP: static_times(len(merged), static_ts),
    }
    for column in EMBEDDING_COLUMNS.values():
        if column in merged.columns:
            values = [
                None if v is None or np.ndim(v) == 0 else v for v in merged[column]
            ]  # NaN from the merge
            columns[column] = pa.array(values, pa.list_(pa.float32()))
    return pa.table(columns)
