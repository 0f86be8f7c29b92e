"""Feast features (docs/design.md, "Architecture and data flow": the features stage, Feast apply +
materialize, and the DIN samples from point-in-time feature retrieval).

A feature repo directory (``cfg.feast.repo_dir``; by default ``<work_dir>/feast``) holds
``feature_store.yaml``, generated from ``cfg.feast`` (never edit it: Feast silently ignores unknown keys),
and ``data/``: one parquet table per feature view (the file sources of Feast's dask offline store) and,
locally, the registry and the sqlite online store.

Entities ``user`` (user_id) and ``item`` (item_id); feature views:

====================  ====  ===============================================  ==============================
view                  key   features                                         rows stamped
====================  ====  ===============================================  ==============================
user_sequences        user  hist_item_ids, hist_behaviors, hist_ts: the      each distinct event time of the
                            newest ``samples.max_history`` behaviours up to  user
                            AND including the row's time, newest last;
                            sequence_ts: the row's time
item_attributes       item  category_id, brand_id, shop_id, title_tokens,    static
                            first_seen
item_stats            item  stats_ts (the snapshot's time), n_<behaviour>    a zero row when the data
                            counts (marn.data.stats) and the items' static   starts, then daily snapshots
                            numeric columns (price ...)
item_embeddings       item  image_embedding, title_embedding                 static; only when the embed
                                                                             stage wrote them
item_representations  item  item_rep: MARN's rep = s + c (paper 4.9.2)       registration time; one view
_<model>_<version>                                                           per registered version
====================  ====  ===============================================  ==============================

Static rows carry the dataset's earliest timestamp and never expire (ttl 0), so every sample finds them;
item_stats never expires either (a cumulative count holds until the next snapshot); user_sequences rows
expire after ``feast.ttl_days``. Feature services ``marn_v1`` and ``dupn_v1`` (the
two A/B arms) group the views; ``marn_v1`` adds the item representation views once they exist.

Item representations are versioned: the view's name carries the model version
(``item_representations_marn_v0003``), because they are only valid with the weights that made them.
Registration publishes the new version's view before the champion flips, and a scorer reads only its own
version's view, so a running scorer never combines new representations with old weights. Versions coexist;
:func:`delete_item_representations` drops the views (registry, online rows, table) of versions no longer
served (marn.stages.register_stage keeps the new champion and the one it replaces).

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

import json
import logging
import os
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from marn.config import Config
from marn.data.samples import (
    SAMPLE_SCHEMA,
    SPLITS,
    Samples,
    candidate_stat_columns,
    concatenated_ranges,
    history_stat_columns,
    sample_targets,
)
from marn.data.schema import IMAGE_EMBEDDINGS, TITLE_EMBEDDINGS, TS, Dataset, read_dataset
from marn.data.stats import STAT_PREFIX, earliest_time, item_stat_table, snapshot_slots, stat_names
from marn.data.text.tokenize import tokenize_titles

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore, FeatureView

log = logging.getLogger(__name__)

TABLES_DIR = "data"  # inside the repo dir, as in Feast's template
TIMESTAMP = "event_timestamp"  # every table's row time; Feast's default entity-frame column name
AS_OF_SHIFT = pd.Timedelta(microseconds=1)  # targets are retrieved as of t - 1 µs: history strictly before t

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
MARN_SERVICE = "marn_v1"
DUPN_SERVICE = "dupn_v1"

HISTORY_COLUMNS = ("hist_item_ids", "hist_behaviors", "hist_ts")  # user_sequences features = sample columns
SEQUENCE_TIME = "sequence_ts"  # a user_sequences row's own time: the key a point-in-time join returns
STATS_TIME = "stats_ts"  # the snapshot time, kept as a feature so a sample shows which snapshot it saw
EMBEDDING_COLUMNS = {IMAGE_EMBEDDINGS: "image_embedding", TITLE_EMBEDDINGS: "title_embedding"}
REP_COLUMN = "item_rep"

YAML_HEADER = (
    "# Generated by marn.features.write_feature_store_yaml from the config's feast section; do not edit:\n"
    "# Feast silently ignores unknown keys, so a hand-made typo would go unnoticed.\n"
)


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


def default_repo_dir(cfg: Config) -> Path:
    return cfg.feast.repo_dir if cfg.feast.repo_dir is not None else cfg.paths.work_dir / "feast"


# -- feature_store.yaml ------------------------------------------------------------------------------------


def write_feature_store_yaml(repo_dir: str | Path, cfg: Config) -> Path:
    """``repo_dir/feature_store.yaml`` from ``cfg.feast``: local provider, file registry, dask offline store,
    sqlite (local) or redis (cluster) online store. Relative paths resolve against the repo dir."""
    repo_dir = Path(repo_dir)
    if cfg.feast.online_store == "redis":
        online: dict[str, Any] = {"type": "redis", "connection_string": cfg.feast.redis_connection}
    else:
        online = {"type": "sqlite", "path": f"{TABLES_DIR}/online_store.db"}
    settings = {
        "project": cfg.feast.project,
        "provider": "local",
        "registry": f"{TABLES_DIR}/registry.db",
        "online_store": online,
        "offline_store": {"type": "file"},  # dask over parquet
        "entity_key_serialization_version": 3,
    }
    repo_dir.mkdir(parents=True, exist_ok=True)
    path = repo_dir / "feature_store.yaml"
    path.write_text(YAML_HEADER + yaml.safe_dump(settings, sort_keys=False))
    return path


# -- offline tables ----------------------------------------------------------------------------------------


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


def _static_times(n: int, static_ts: pd.Timestamp) -> pa.Array:
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
            TIMESTAMP: _static_times(len(items), static_ts),
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
        TIMESTAMP: _static_times(len(merged), static_ts),
    }
    for column in EMBEDDING_COLUMNS.values():
        if column in merged.columns:
            values = [
                None if v is None or np.ndim(v) == 0 else v for v in merged[column]
            ]  # NaN from the merge
            columns[column] = pa.array(values, pa.list_(pa.float32()))
    return pa.table(columns)


# -- Feast objects -----------------------------------------------------------------------------------------


def feature_definitions(tables_dir: str | Path, cfg: Config) -> list[Any]:
    """Entities, file sources, feature views and feature services over the tables in ``tables_dir``.

    Optional views (item_embeddings, one item_representations view per published version) are defined
    only when their table exists.
    Raises FileNotFoundError when a required table is missing (build_feature_tables writes them).
    """
    from feast import Entity, ValueType

    tables_dir = Path(tables_dir).resolve()
    missing = [v for v in REQUIRED_VIEWS if not table_path(tables_dir, v).exists()]
    if missing:
        raise FileNotFoundError(
            f"{tables_dir}: no feature table(s) for {missing}; build them with "
            "marn.features.build_feature_tables (or materialize_features)"
        )
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="a shopper")
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING, description="a product")
    ttl_days = cfg.feast.ttl_days
    views = {
        USER_SEQUENCES: _view(tables_dir, USER_SEQUENCES, user, ttl_days, "behaviour history for APGRU/DUPN"),
        ITEM_ATTRIBUTES: _view(tables_dir, ITEM_ATTRIBUTES, item, 0, "ID and title modalities"),
        # Cumulative counts stay true until the next snapshot: no ttl, or an item quiet for ttl_days would
        # read zeros here and its real counts on the local path and online.
        ITEM_STATS: _view(tables_dir, ITEM_STATS, item, 0, "statistic modality, point in time"),
    }
    if table_path(tables_dir, ITEM_EMBEDDINGS).exists():
        views[ITEM_EMBEDDINGS] = _view(tables_dir, ITEM_EMBEDDINGS, item, 0, "image and title vectors")
    for name in representation_tables(tables_dir):
        views[name] = _representations_view(tables_dir, name, item)
    sources = [view.batch_source for view in views.values()]
    return [user, item, *sources, *views.values(), *_services(views)]


def _feast_type(name: str, arrow_type: pa.DataType) -> Any:
    from feast.types import Array, Float32, Float64, Int64, String, UnixTimestamp

    if pa.types.is_list(arrow_type):
        return Array(_feast_type(name, arrow_type.value_type))
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return String
    if pa.types.is_timestamp(arrow_type):
        return UnixTimestamp
    if pa.types.is_int64(arrow_type):
        return Int64
    if pa.types.is_float32(arrow_type):
        return Float32
    if pa.types.is_float64(arrow_type):
        return Float64
    raise ValueError(f"feature table column {name!r} has type {arrow_type}, which no feature here uses")


def _view(tables_dir: Path, name: str, entity: Any, ttl_days: int, description: str) -> FeatureView:
    """A view over ``tables_dir/<name>.parquet`` whose schema is the table's (every column but the key and
    the row time). ttl 0: static rows that never expire."""
    from datetime import timedelta

    from feast import FeatureView, Field, FileSource

    path = table_path(tables_dir, name)
    schema = pq.read_schema(path)
    keys = {entity.join_key, TIMESTAMP}
    fields = [Field(name=f.name, dtype=_feast_type(f.name, f.type)) for f in schema if f.name not in keys]
    source = FileSource(name=f"{name}_source", path=str(path), timestamp_field=TIMESTAMP)
    return FeatureView(
        name=name,
        entities=[entity],
        ttl=timedelta(days=ttl_days),
        schema=fields,
        source=source,
        online=True,
        description=description,
    )


def _representations_view(tables_dir: Path, name: str, item: Any) -> FeatureView:
    version = REPRESENTATIONS_VIEW.match(name)
    if version is None:
        raise ValueError(f"{name!r} is no item representations view name")
    what = f"{version['model']} {version['version']}"
    return _view(tables_dir, name, item, 0, f"item representations of {what} (paper 4.9.2)")


def _services(views: dict[str, FeatureView]) -> list[FeatureService]:
    """One service per A/B arm: what its scorer reads. Both see the optional views that exist."""
    from feast import FeatureService

    common = [views[v] for v in (USER_SEQUENCES, ITEM_ATTRIBUTES, ITEM_STATS, ITEM_EMBEDDINGS) if v in views]
    marn = common + [view for name, view in views.items() if REPRESENTATIONS_VIEW.match(name)]
    return [
        FeatureService(
            name=MARN_SERVICE, features=marn, description="MARN arm: sequences and all modalities"
        ),
        FeatureService(
            name=DUPN_SERVICE, features=common, description="DUPN arm: sequences and item features"
        ),
    ]


REDIS_PASSWORD_ENV = "MARN_REDIS_PASSWORD"  # the cluster sets it from the Secret marn-redis (key password)


def redis_connection_with_password(connection: str, password: str) -> str:
    """``host:port[,...]`` plus the password, as Feast's Redis store parses it (comma-separated, each value
    JSON-decoded when it can be): a password that parsing would change is refused, not silently mangled."""
    if not password or any(c in password for c in ",\n\r") or password != password.strip():
        raise ValueError(f"{REDIS_PASSWORD_ENV}: empty, or with a comma, newline or outer spaces")
    try:
        decoded = json.loads(password)
    except json.JSONDecodeError:
        decoded = password
    if decoded != password:  # 1234 or 1e10 would reach Redis as a number's text, true as a bool
        raise ValueError(f"{REDIS_PASSWORD_ENV}: Feast would read it as JSON ({type(decoded).__name__})")
    if "password=" in connection:
        raise ValueError("feast.redis_connection carries a password: keep it in the environment only")
    return f"{connection},password={password}"


def open_store(repo_dir: str | Path) -> FeatureStore:
    """The repo's store; a Redis password comes from the environment at run time, so it is never in
    feature_store.yaml, the config, a KFP parameter or a checkpoint."""
    repo_dir = Path(repo_dir)
    if not (repo_dir / "feature_store.yaml").exists():
        raise FileNotFoundError(f"{repo_dir}: no feature_store.yaml; run materialize_features first")
    from feast import FeatureStore
    from feast.repo_config import load_repo_config

    config = load_repo_config(repo_dir, repo_dir / "feature_store.yaml")
    password = os.environ.get(REDIS_PASSWORD_ENV)
    online = config.online_config
    if password is not None and isinstance(online, dict) and online.get("type") == "redis":
        online["connection_string"] = redis_connection_with_password(online["connection_string"], password)
    return FeatureStore(repo_path=str(repo_dir), config=config)


# -- apply + materialize -----------------------------------------------------------------------------------


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
    repo_dir = Path(repo_dir) if repo_dir is not None else default_repo_dir(cfg)
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


# -- point-in-time samples ---------------------------------------------------------------------------------


def samples_from_feature_store(dataset: Dataset, cfg: Config, repo_dir: str | Path | None = None) -> Samples:
    """DIN samples whose histories and item statistics come from Feast's point-in-time join.

    The targets are :func:`marn.data.samples.sample_targets` (the same positives and seeded negatives as
    build_samples); each is joined as of ``ts - 1 µs`` with marn_v1's user_sequences view, and the
    candidate and every history item with its item_stats view as of the newest snapshot before ``ts``
    (see the module docstring). The splits hold SAMPLE_SCHEMA's columns, then ``stat_<name>`` and
    ``hist_stat_<name>`` as build_samples writes them. Item attributes and vectors are not copied into
    every sample: the model reads them once per item from its catalogue.
    """
    repo_dir = Path(repo_dir) if repo_dir is not None else default_repo_dir(cfg)
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


# -- online ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineFeatures:
    # user_id, hist_item_ids, hist_behaviors, hist_ts (whole seconds: Feast's online timestamp type);
    # None for unknown users
    users: pd.DataFrame
    items: pd.DataFrame  # item_id and every item feature registered; None for unknown items


def online_features(repo_dir: str | Path, user_ids: Sequence[str], item_ids: Sequence[str]) -> OnlineFeatures:
    """Serving lookups from the online store: the users' latest sequences and the items' features, in
    request order. Unknown ids come back with null features (cold start), not as errors."""
    store = open_store(repo_dir)
    views = {v.name: v for v in store.list_feature_views()}
    item_refs = [
        f"{name}:{f.name}" for name, view in views.items() if "item" in view.entities for f in view.features
    ]
    user_refs = [f"{USER_SEQUENCES}:{name}" for name in HISTORY_COLUMNS]

    def lookup(key: str, ids: Sequence[str], refs: list[str]) -> pd.DataFrame:
        if not ids:
            return pd.DataFrame({key: pd.Series(dtype=str)})
        rows = [{key: str(i)} for i in ids]
        return store.get_online_features(features=refs, entity_rows=rows).to_df()

    return OnlineFeatures(
        users=lookup("user_id", user_ids, user_refs), items=lookup("item_id", item_ids, item_refs)
    )


def write_item_representations(
    repo_dir: str | Path,
    item_ids: Sequence[str],
    vectors: np.ndarray,
    ts: datetime,
    *,
    model: str,
    version: str,
) -> Path:
    """Store ``model`` ``version``'s precomputed item representations (paper 4.9.2) stamped ``ts`` in
    their own view (:func:`representations_view`) and materialize them online; other versions' views are
    left as they are. Adds the view to marn_v1. Needs an applied repo (materialize_features). Returns the
    table's path.
    """
    view = representations_view(model, version)
    if len(item_ids) == 0:
        raise ValueError("no item representations to write")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(item_ids):
        raise ValueError(f"vectors must be (len(item_ids)={len(item_ids)}, dim); got shape {vectors.shape}")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item_ids has duplicates: one representation per item")
    if not np.isfinite(vectors).all():
        raise ValueError("item representations contain NaN or infinite values")
    stamp = pd.Timestamp(ts)
    if stamp.tzinfo is None:
        raise ValueError(f"ts must be timezone-aware (UTC), got {ts!r}")
    stamp = stamp.tz_convert("UTC").as_unit("us")

    store = open_store(repo_dir)
    # Beside the other tables, wherever they are (feature_repo/definitions.py may point elsewhere).
    tables_dir = Path(store.get_feature_view(ITEM_ATTRIBUTES).batch_source.path).parent
    path = table_path(tables_dir, view)
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), pa.float32())
    table = pa.table(
        {
            "item_id": pa.array([str(i) for i in item_ids], pa.string()),
            TIMESTAMP: _static_times(len(item_ids), stamp),
            REP_COLUMN: pa.FixedSizeListArray.from_arrays(flat, dim).cast(pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, path)

    views = {v.name: v for v in store.list_feature_views()}
    views[view] = _representations_view(tables_dir, view, store.get_entity("item"))
    store.apply([views[view].batch_source, views[view], *_services(views)])
    store.materialize(start_date=stamp.to_pydatetime(), end_date=stamp.to_pydatetime(), feature_views=[view])
    return path


def delete_item_representations(repo_dir: str | Path, model: str, keep: Collection[str]) -> list[str]:
    """Drop every representations view of ``model`` whose version is not in ``keep``: from the registry
    and marn_v1, its online rows (Feast deletes a deleted view's online table or Redis fields) and its
    offline table. Returns the dropped views' names."""
    store = open_store(repo_dir)
    views = {v.name: v for v in store.list_feature_views()}
    stale = []
    for name in views:
        match = REPRESENTATIONS_VIEW.match(name)
        if match and match["model"] == model and match["version"] not in keep:
            stale.append(name)
    if not stale:
        return []
    remaining = {name: view for name, view in views.items() if name not in stale}
    doomed = [views[name] for name in stale]
    store.apply(
        _services(remaining), objects_to_delete=[*doomed, *(v.batch_source for v in doomed)], partial=False
    )
    for view in doomed:
        Path(view.batch_source.path).unlink(missing_ok=True)
    return stale
