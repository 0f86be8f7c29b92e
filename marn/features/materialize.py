"""Apply and materialize: build the tables, write feature_store.yaml, apply the Feast objects and load the
data's time range into the online store."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from marn.config import Config, work_path
from marn.data.schema import TS, read_dataset
from marn.features.repo import TABLES_DIR, feature_definitions, open_store, write_feature_store_yaml
from marn.features.tables import TIMESTAMP, USER_SEQUENCES, build_feature_tables, table_path

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSummary:
    repo_dir: Path
    rows: dict[str, int]  # view -> rows in its offline table
    feature_views: tuple[str, ...]
    feature_services: tuple[str, ...]
    start: datetime  # the materialized window: the data's whole time range
    end: datetime
    apply_s: float
    materialize_s: float
    seconds: float  # everything: tables, apply, materialize


def materialize_features(
    data_dir: str | Path, cfg: Config, repo_dir: str | Path | None = None, as_of: datetime | None = None
) -> FeatureSummary:
    """Build the tables, write feature_store.yaml, apply the definitions (dropping views that no longer
    exist) and materialize the data's whole time range into the online store. Idempotent: a rerun on
    the same data leaves the same online values.

    ``as_of``: materialize only rows stamped up to then, so the online store holds the state of that
    moment (the newest statistic snapshot and behaviour sequence of each entity at ``as_of``): replays
    of past requests read what they would have read then."""
    started = time.perf_counter()
    repo_dir = Path(repo_dir) if repo_dir is not None else work_path(cfg, cfg.feast.repo_dir, "feast")
    tables_dir = repo_dir / TABLES_DIR
    paths = build_feature_tables(read_dataset(data_dir), cfg, tables_dir)
    write_feature_store_yaml(repo_dir, cfg)
    store = open_store(repo_dir)
    objects = feature_definitions(tables_dir, cfg)

    applied = time.perf_counter()
    names = {obj.name for obj in objects}
    stale = [v for v in store.list_feature_views() if v.name not in names]
    stale += [s for s in store.list_feature_services() if s.name not in names]
    store.apply(objects, objects_to_delete=stale, partial=not stale)
    apply_s = time.perf_counter() - applied

    start, end = _time_range(paths.values())
    if as_of is not None:
        if as_of.tzinfo is None:
            raise ValueError(f"as_of must be timezone-aware (UTC), got {as_of!r}")
        end = min(end, as_of)
    materializing = time.perf_counter()
    _materialize(store, tables_dir, start, end)
    materialize_s = time.perf_counter() - materializing

    summary = FeatureSummary(
        repo_dir=repo_dir,
        rows={view: pq.read_metadata(path).num_rows for view, path in paths.items()},
        feature_views=tuple(sorted(v.name for v in store.list_feature_views())),
        feature_services=tuple(sorted(s.name for s in store.list_feature_services())),
        start=start,
        end=end,
        apply_s=apply_s,
        materialize_s=materialize_s,
        seconds=time.perf_counter() - started,
    )
    log.info("feast: %s rows materialized in %.2f s", summary.rows, materialize_s)
    return summary


def _materialize(store: FeatureStore, tables_dir: Path, start: datetime, end: datetime) -> None:
    """Feast's materialize(start, end) for every view but user_sequences (not materialize_incremental:
    that starts at now - ttl and misses older data). user_sequences' newest row per user, which is what
    materialize keeps, is written with write_to_online_store instead: through the dask path its list
    columns cost ~40x more (14 s for 2000 users), as dask tokenizes object columns by pickling them."""
    others = [v.name for v in store.list_feature_views() if v.name != USER_SEQUENCES]
    store.materialize(start_date=start, end_date=end, feature_views=others)
    table = pq.read_table(table_path(tables_dir, USER_SEQUENCES))
    table = table.filter(pc.less_equal(table.column(TIMESTAMP), pa.scalar(end, TS)))
    if table.num_rows == 0:
        return
    table = table.sort_by([("user_id", "ascending"), (TIMESTAMP, "ascending")])
    users = table.column("user_id").to_numpy(zero_copy_only=False)
    newest = pa.array(np.r_[users[1:] != users[:-1], True])
    store.write_to_online_store(USER_SEQUENCES, table.filter(newest).to_pandas())


def _time_range(paths: Any) -> tuple[datetime, datetime]:
    """Earliest and latest row time over the tables (materialize's window is inclusive at both ends)."""
    lows, highs = [], []
    for path in paths:
        column = pq.read_table(path, columns=[TIMESTAMP]).column(TIMESTAMP)
        if len(column):
            lows.append(pc.min(column).as_py())
            highs.append(pc.max(column).as_py())
    if not lows:
        raise ValueError("the feature tables are empty: nothing to materialize")
    return min(lows), max(highs)
