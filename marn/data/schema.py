"""The canonical data contract (docs/design.md): every importer writes these tables, nothing downstream knows
the source.

A dataset directory holds:

- ``events.parquet``     one row per user behaviour: user_id, item_id, behavior, ts (UTC), optional label.
- ``items.parquet``      one row per item: ids, title, image_uri, first_seen, and static numeric statistics
                         (any extra numeric column, e.g. price or runtime).
- ``users.parquet``      optional profile columns keyed by user_id.
- ``item_stats.parquet`` optional, derived from events by :mod:`marn.data.stats`: daily point-in-time
                         snapshots of behaviour counts per item, each computed from strictly earlier events.

``image_uri`` is a path; a relative one is resolved against the dataset directory, so a synthetic dataset
can be moved as a whole, while an importer may point at media it must not copy (absolute paths).

``items.first_seen`` is required, but a source may lack it: :func:`write_dataset` and :func:`read_dataset`
then derive it from the events (:func:`with_first_seen`: each item's first event, null for an item without
events). :func:`conform` alone has no events and rejects items without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

EVENTS, ITEMS, USERS, ITEM_STATS = "events", "items", "users", "item_stats"
TABLE_FILES = {name: f"{name}.parquet" for name in (EVENTS, ITEMS, USERS, ITEM_STATS)}
REQUIRED_TABLES = (EVENTS, ITEMS)
# What the embed stage adds to a dataset directory: item_id, embedding (list<float32>)
IMAGE_EMBEDDINGS = "image_embeddings.parquet"
TITLE_EMBEDDINGS = "title_embeddings.parquet"
# The courier stage (marn.embed.courier), same columns as IMAGE_EMBEDDINGS; read when embed.method is courier
COURIER_EMBEDDINGS = "courier_embeddings.parquet"
COURIER_HEAD = "courier_head.pt"  # the head that wrote it: maps a new item's backbone vector into its space

# Behaviour types of the paper (click, add-to-cart, purchase) plus explicit ratings (MovieLens) and
# reviews (Amazon), which the DIN protocol treats as positive interactions.
BEHAVIORS = ("click", "cart", "purchase", "rating", "review")

TS = pa.timestamp("us", tz="UTC")

FIRST_SEEN = "first_seen"  # items column derived from events when a source lacks it (with_first_seen)

log = logging.getLogger(__name__)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("behavior", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),
    ]
)
EVENTS_LABEL = pa.field("label", pa.int8())  # optional column: explicit 0/1 labels (exposure logs)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("category_id", pa.string(), nullable=False),
        pa.field("brand_id", pa.string()),
        pa.field("shop_id", pa.string()),
        pa.field("title", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field(FIRST_SEEN, TS),
    ]
)

USERS_KEY = pa.schema([pa.field("user_id", pa.string(), nullable=False)])

ITEM_STATS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=False),  # snapshot time: counts use events strictly before it
    ]
)

REQUIRED_SCHEMAS = {
    EVENTS: EVENTS_SCHEMA,
    ITEMS: ITEMS_SCHEMA,
    USERS: USERS_KEY,
    ITEM_STATS: ITEM_STATS_SCHEMA,
}


class SchemaError(ValueError):
    """A table does not follow the canonical contract; the message names the table and column."""


@dataclass(frozen=True)
class Dataset:
    """A canonical dataset held in memory. ``users`` and ``item_stats`` may be absent."""

    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None
    item_stats: pd.DataFrame | None = None
    root: Path | None = None  # the directory it was read from; relative image paths resolve against it


def item_stat_columns(items: pd.DataFrame) -> list[str]:
    """Static numeric statistics of items: every numeric column beyond the required ones."""
    required = set(ITEMS_SCHEMA.names)
    return [c for c in items.columns if c not in required and pd.api.types.is_numeric_dtype(items[c])]


def conform(table: str, df: pd.DataFrame) -> pa.Table:
    """Check ``df`` against the contract of ``table`` and return it as an arrow table in canonical types.

    Required columns come first in contract order; extra columns (statistics, profile fields) follow.
    Raises SchemaError naming the table and the offending column.
    """
    schema = REQUIRED_SCHEMAS[table]
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        message = f"{table}: missing required column(s) {missing}; have {list(df.columns)}"
        if table == ITEMS and FIRST_SEEN in missing:
            message += (
                f"; {FIRST_SEEN} needs the events: write_dataset and read_dataset derive it from them "
                "(each item's first event ts) when items lack it"
            )
        raise SchemaError(message)
    fields = list(schema)
    if table == EVENTS and "label" in df.columns:
        fields.append(EVENTS_LABEL)
    extra = [c for c in df.columns if c not in {f.name for f in fields}]
    columns, out_fields = [], []
    for field in fields:
        try:
            array = pa.array(_canonical_values(df[field.name], field.type), type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as err:
            raise SchemaError(f"{table}.{field.name}: cannot convert to {field.type}: {err}") from err
        columns.append(array)
        out_fields.append(field.with_nullable(True))  # nulls are the validator's job, with a readable report
    for name in extra:
        array = pa.Array.from_pandas(df[name])
        columns.append(array)
        out_fields.append(pa.field(name, array.type))
    return pa.Table.from_arrays(columns, schema=pa.schema(out_fields))


def _canonical_values(series: pd.Series, arrow_type: pa.DataType):
    if pa.types.is_timestamp(arrow_type):
        values = pd.to_datetime(series, utc=True)
        return values.dt.as_unit("us")  # arrow keeps microseconds; feast's duckdb store needs them too
    if pa.types.is_string(arrow_type):
        return series.astype("string").astype(object).where(series.notna(), None)
    return series


def first_seen(events: pd.DataFrame) -> pd.Series:
    """Each item's first event time, indexed by item_id: the first moment the platform knew the item."""
    return events.groupby("item_id", sort=False, observed=True)["ts"].min()


def with_first_seen(items: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """``items`` as it is when it has ``first_seen``, else a copy with ``first_seen`` derived from ``events``.

    The derived value is the item's earliest event ``ts`` (UTC, microseconds, as the contract stores it);
    an item without events gets NaT. Ids are matched in their canonical (string) form.
    """
    if FIRST_SEEN in items.columns:
        return items
    ts = events["ts"]
    if not pd.api.types.is_datetime64_any_dtype(ts):  # e.g. ISO text with offsets: compare instants
        ts = pd.to_datetime(ts, utc=True)
    seen = first_seen(pd.DataFrame({"item_id": events["item_id"], "ts": ts}))  # one row per distinct id
    seen.index = pd.Index(_canonical_values(seen.index.to_series(), pa.string()))
    seen = _canonical_values(seen.groupby(level=0).min(), TS)  # ids equal as strings (1 and "1") merge
    keys = _canonical_values(items["item_id"], pa.string())
    derived = keys.map(seen).astype(seen.dtype)
    log.info(
        "items.%s derived from events (each item's first event): %d of %d items have events",
        FIRST_SEEN,
        int(derived.notna().sum()),
        len(items),
    )
    return items.assign(**{FIRST_SEEN: derived})


def write_table(data_dir: str | Path, table: str, df: pd.DataFrame) -> Path:
    """Write one canonical table into ``data_dir`` (created if needed)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / TABLE_FILES[table]
    pq.write_table(conform(table, df), path)
    return path


def write_dataset(data_dir: str | Path, dataset: Dataset) -> None:
    """Write every table the dataset holds; items without ``first_seen`` get it derived from the events."""
    items = with_first_seen(dataset.items, dataset.events)
    for table in (EVENTS, ITEMS, USERS, ITEM_STATS):
        df = items if table == ITEMS else getattr(dataset, table)
        if df is not None:
            write_table(data_dir, table, df)


def read_table(data_dir: str | Path, table: str) -> pd.DataFrame | None:
    """Read one table; None for an absent optional table, FileNotFoundError for an absent required one."""
    path = Path(data_dir) / TABLE_FILES[table]
    if not path.exists():
        if table in REQUIRED_TABLES:
            raise FileNotFoundError(f"{path} is missing: a dataset directory needs {TABLE_FILES[table]}")
        return None
    return pq.read_table(path).to_pandas()


def read_dataset(data_dir: str | Path) -> Dataset:
    """Read a dataset directory; items without ``first_seen`` get it derived from the events."""
    tables = {table: read_table(data_dir, table) for table in (EVENTS, ITEMS, USERS, ITEM_STATS)}
    tables[ITEMS] = with_first_seen(tables[ITEMS], tables[EVENTS])
    return Dataset(**tables, root=Path(data_dir))


def resolve_image_uri(data_dir: str | Path, image_uri: str | None) -> Path | None:
    """Relative image paths are relative to the dataset directory; absolute ones are used as they are."""
    if image_uri is None or (isinstance(image_uri, float) and pd.isna(image_uri)) or image_uri == "":
        return None
    path = Path(image_uri)
    return path if path.is_absolute() else Path(data_dir) / path
