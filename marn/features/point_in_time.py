"""DIN samples from Feast's point-in-time join (docs/design.md, "Point in time").

Point in time: a target at time t is retrieved as of ``t - 1 µs`` (``AS_OF_SHIFT``), so its user_sequences
row is the newest one stamped before t and its history holds only events strictly before t. Events of the
user at exactly t (ties with the target) are left out; :func:`marn.data.samples.build_samples` keeps the
tied events that come earlier in file order instead, so both agree on data without ties per user. The
statistics of the candidate and of every history item are read from the newest snapshot stamped strictly
before t, exactly as :func:`marn.data.stats.stats_before` reads them on the local path.

Feast 0.67's dask offline store collapses entity rows that share the first view's join keys and the
timestamp (feast-dev/feast#6787; a row-id column does not help), and a target's positive and negative share
both. So retrieval runs once per entity kind on unique (key, time) rows, merged back onto the targets.

Speed: dask tokenizes object columns (lists) by pickling them at every ``persist``, which made list
features ~40-50x slower than scalars. So the point-in-time join asks Feast only for user_sequences'
``sequence_ts`` (the chosen row's key) and takes the lists from that row of the view's table, and
materialization writes user_sequences' newest row per user with ``write_to_online_store`` (the row
``materialize`` would keep). Both are exact: Feast still decides which row applies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from marn.config import Config, work_path
from marn.data.samples import (
    SAMPLE_SCHEMA,
    SPLITS,
    Samples,
    candidate_stat_columns,
    concatenated_ranges,
    history_stat_columns,
    sample_targets,
)
from marn.data.schema import TS, Dataset
from marn.data.stats import STAT_PREFIX, snapshot_slots
from marn.features.repo import MARN_SERVICE, open_store
from marn.features.tables import (
    HISTORY_COLUMNS,
    ITEM_STATS,
    SEQUENCE_TIME,
    STATS_TIME,
    TIMESTAMP,
    USER_SEQUENCES,
)

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

log = logging.getLogger(__name__)

AS_OF_SHIFT = pd.Timedelta(microseconds=1)  # targets are retrieved as of t - 1 µs: history strictly before t


def samples_from_feature_store(dataset: Dataset, cfg: Config, repo_dir: str | Path | None = None) -> Samples:
    """DIN samples whose histories and item statistics come from Feast's point-in-time join.

    The targets are :func:`marn.data.samples.sample_targets` (the same positives and seeded negatives as
    build_samples); each is joined as of ``ts - 1 µs`` with marn_v1's user_sequences view, and the
    candidate and every history item with its item_stats view as of the newest snapshot before ``ts``
    (see the module docstring). The splits hold SAMPLE_SCHEMA's columns, then ``stat_<name>`` and
    ``hist_stat_<name>`` as build_samples writes them. Item attributes and vectors are not copied into
    every sample: the model reads them once per item from its catalogue.
    """
    repo_dir = Path(repo_dir) if repo_dir is not None else work_path(cfg, cfg.feast.repo_dir, "feast")
    store = open_store(repo_dir)
    refs = _service_refs(store.get_feature_service(MARN_SERVICE), (USER_SEQUENCES, ITEM_STATS))
    if f"{USER_SEQUENCES}:{SEQUENCE_TIME}" not in refs[USER_SEQUENCES]:
        raise ValueError(
            f"{MARN_SERVICE} lacks {USER_SEQUENCES}:{SEQUENCE_TIME}; re-run materialize_features"
        )
    targets = sample_targets(dataset, cfg.samples)
    targets[TIMESTAMP] = (targets["ts"] - AS_OF_SHIFT).dt.as_unit("ns")

    started = time.perf_counter()
    # Feast picks each target's user_sequences row (by its key, SEQUENCE_TIME); the lists are then taken
    # from that row of the view's own table. Joining the lists inside Feast costs ~50x more: dask
    # tokenizes object columns by pickling them, again at every persist.
    rows = _retrieve(store, targets, "user_id", [f"{USER_SEQUENCES}:{SEQUENCE_TIME}"])
    joined = targets.merge(rows, on=["user_id", TIMESTAMP], how="left", validate="many_to_one")
    sequences = pq.read_table(store.get_feature_view(USER_SEQUENCES).batch_source.path)
    joined["_sequence_row"] = _row_index(sequences, joined["user_id"], joined[SEQUENCE_TIME])
    tables = {
        split: _sample_table(joined[joined["split"] == split], sequences, cfg.samples.max_history)
        for split in SPLITS
    }
    tables = _with_statistics(
        store, tables, [r for r in refs[ITEM_STATS] if not r.endswith(f":{STATS_TIME}")]
    )
    log.info("feast: point-in-time join of %d targets in %.2f s", len(targets), time.perf_counter() - started)
    return Samples(**tables)


def _with_statistics(
    store: FeatureStore, tables: dict[str, pa.Table], refs: list[str]
) -> dict[str, pa.Table]:
    """Append the candidate's and every history item's statistics, from Feast's item_stats view, as of
    the newest snapshot stamped before each sample's time: one retrieval for all splits."""
    path = store.get_feature_view(ITEM_STATS).batch_source.path
    moments = np.unique(pq.read_table(path, columns=[TIMESTAMP]).column(TIMESTAMP).to_numpy())
    names = [ref.split(":", 1)[1] for ref in refs]
    parts, items, times = [], [], []
    for split, table in tables.items():
        ts = table.column("ts").to_numpy()  # datetime64[us]
        history = table.column("hist_item_ids").combine_chunks()
        lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False)
        parts.append((split, table.num_rows, int(lengths.sum()), np.r_[0, np.cumsum(lengths)]))
        items += [table.column("item_id").to_numpy(zero_copy_only=False), history.flatten().to_numpy(False)]
        times += [ts, np.repeat(ts, lengths)]
    values = _stats_before(store, refs, np.concatenate(items), np.concatenate(times), moments)
    out, start = {}, 0
    for split, n, n_history, offsets in parts:
        candidate, history = values[start : start + n], values[start + n : start + n + n_history]
        start += n + n_history
        columns = {
            **candidate_stat_columns(names, candidate),
            **history_stat_columns(names, history, offsets),
        }
        table = tables[split]
        for column, array in columns.items():
            table = table.append_column(column, array)
        out[split] = table
    return out


def _stats_before(
    store: FeatureStore, refs: list[str], items: np.ndarray, times: np.ndarray, moments: np.ndarray
) -> np.ndarray:
    """(n, F) statistics of each (item, t) from Feast, as of g = the newest snapshot time before t: no
    snapshot of any item lies in (g, t), so this is the join as of t - 1 µs on far fewer entity rows.
    Counts with no snapshot in reach are 0, statics NaN (as :func:`marn.data.stats.stats_before`)."""
    names = [ref.split(":", 1)[1] for ref in refs]
    counts = [n.startswith(STAT_PREFIX) for n in names]
    slot = snapshot_slots(moments, times.astype(moments.dtype))
    keys = pd.DataFrame({"item_id": items.astype(str), "_slot": slot})
    distinct = keys[keys["_slot"] >= 0].drop_duplicates(ignore_index=True)
    out = np.full((len(keys), len(names)), np.nan)
    out[:, counts] = 0.0
    if distinct.empty:
        return out
    distinct[TIMESTAMP] = (
        pd.to_datetime(moments[distinct["_slot"].to_numpy()]).tz_localize("UTC").as_unit("ns")
    )
    found = _retrieve(store, distinct, "item_id", refs)
    found = distinct.merge(found, on=["item_id", TIMESTAMP], how="left", validate="one_to_one")
    values = keys.merge(found.drop(columns=TIMESTAMP), on=["item_id", "_slot"], how="left")
    out = values[names].to_numpy(dtype=np.float64)
    out[:, counts] = np.nan_to_num(out[:, counts], nan=0.0)
    return out


def _service_refs(service: FeatureService, views: Sequence[str]) -> dict[str, list[str]]:
    """``view:feature`` references of the service's projections of ``views``."""
    projections = {p.name: p for p in service.feature_view_projections}
    missing = [v for v in views if v not in projections]
    if missing:
        raise ValueError(
            f"feature service {service.name!r} lacks view(s) {missing}; re-run materialize_features"
        )
    return {v: [f"{v}:{f.name}" for f in projections[v].features] for v in views}


def _retrieve(store: FeatureStore, targets: pd.DataFrame, key: str, refs: list[str]) -> pd.DataFrame:
    """Point-in-time features for the unique (key, time) rows of ``targets`` (one entity kind per call:
    the dask store would collapse distinct rows sharing a key and time, feast-dev/feast#6787)."""
    entity_df = targets[[key, TIMESTAMP]].drop_duplicates(ignore_index=True)
    out = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP], utc=True).dt.as_unit("ns")
    if len(out) != len(entity_df):
        raise RuntimeError(f"Feast returned {len(out)} rows for {len(entity_df)} unique ({key}, time) rows")
    return out


def _row_index(sequences: pa.Table, users: pd.Series, times: pd.Series) -> np.ndarray:
    """Row of ``sequences`` keyed (user_id, event_timestamp) for each (user, time); -1 where time is null."""
    keys = pd.DataFrame(
        {
            "user_id": sequences.column("user_id").to_numpy(zero_copy_only=False),
            SEQUENCE_TIME: sequences.column(TIMESTAMP).to_pandas().dt.as_unit("ns"),
            "_row": np.arange(sequences.num_rows),
        }
    )
    wanted = pd.DataFrame({"user_id": users.to_numpy(), SEQUENCE_TIME: pd.to_datetime(times, utc=True)})
    wanted[SEQUENCE_TIME] = wanted[SEQUENCE_TIME].dt.as_unit("ns")
    found = wanted.merge(keys, on=["user_id", SEQUENCE_TIME], how="left", validate="many_to_one")
    if found["_row"].isna().any() != times.isna().any():
        raise RuntimeError("user_sequences rows chosen by Feast are missing from its table; re-materialize")
    return found["_row"].fillna(-1).astype(np.int64).to_numpy()


def _tails(lists: pa.ChunkedArray, rows: np.ndarray, keep: int) -> pa.ListArray:
    """The last ``keep`` entries of ``lists[row]`` for each row; an empty list for row -1."""
    lists = lists.combine_chunks()
    offsets = lists.offsets.to_numpy()
    safe = np.maximum(rows, 0)
    ends = np.where(rows >= 0, offsets[safe + 1], 0)
    starts = np.where(rows >= 0, np.maximum(offsets[safe], ends - keep), 0)
    lengths = ends - starts
    index = np.repeat(starts, lengths) + concatenated_ranges(lengths)
    new_offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    return pa.ListArray.from_arrays(new_offsets, lists.values.take(pa.array(index, pa.int64())))


def _sample_table(rows: pd.DataFrame, sequences: pa.Table, max_history: int) -> pa.Table:
    index = rows["_sequence_row"].to_numpy()
    columns = [
        pa.array(rows["user_id"], pa.string()),
        pa.array(rows["item_id"], pa.string()),
        pa.array(rows["label"], pa.int8()),
        pa.array(rows["ts"], TS),
        *(_tails(sequences.column(name), index, max_history) for name in HISTORY_COLUMNS),
    ]
    return pa.Table.from_arrays(columns, schema=SAMPLE_SCHEMA)
