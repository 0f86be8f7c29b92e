"""Structure checks, by hand from the parquet files and their arrow schemas (cheap, and GX cannot run on a
column that is absent or has the wrong type): every required table file exists and is readable, every
required column exists, ids are strings, timestamps are UTC timestamps, counts are numeric. Failures carry
the names of the GX expectations they stand for, so a report reads the same for both layers."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from marn.data import schema
from marn.data.stats import STAT_PREFIX
from marn.validate.report import Failure

log = logging.getLogger(__name__)

_STRING, _TIMESTAMP, _INTEGER, _NUMBER = "string", "UTC timestamp", "integer", "number"


def derivable(table: str, usable: dict[str, set[str]]) -> set[str]:
    """Required columns that ``table`` may lack because :func:`marn.data.schema.read_dataset` derives them:
    items.first_seen, from events with a usable item_id and ts (events are loaded first). The derived
    values are the events' own ts, which the events suite checks, so nothing more is checked for them."""
    if table == schema.ITEMS and {"item_id", "ts"} <= usable.get(schema.EVENTS, set()):
        return {schema.FIRST_SEEN}
    return set()


def load_table(
    data_dir: Path, table: str, failures: list[Failure], derivable: Collection[str] = ()
) -> tuple[pd.DataFrame, set[str]] | None:
    """Read one table and check its columns' presence and types; None when it is absent or unreadable.

    A missing column in ``derivable`` is no failure (see :func:`derivable`)."""
    path = data_dir / schema.TABLE_FILES[table]
    if not path.exists():
        if table in schema.REQUIRED_TABLES:
            failures.append(
                Failure(table, None, "expect_table_file_to_exist", 0, 0, message=f"{path} is missing")
            )
        return None
    try:
        arrow_schema = pq.read_schema(path)
        expected = _expected_types(table, arrow_schema.names)
        columns = _columns_to_read(table, arrow_schema, expected)
        df = _read(path, columns, [c for c in columns if _is_string(arrow_schema.field(c).type)])
    except (pa.ArrowException, OSError) as err:
        failures.append(
            Failure(table, None, "expect_table_file_to_be_readable", 0, 0, message=f"{path}: {err}")
        )
        return None

    usable = set(df.columns)
    for column, kind in expected.items():
        if column not in arrow_schema.names:
            if column in derivable:
                log.info("%s.%s is absent: read_dataset derives it from events.parquet", table, column)
                continue
            message = f"required column missing; have {arrow_schema.names}"
            if table == schema.ITEMS and column == schema.FIRST_SEEN:
                message += "; it cannot be derived either: events.parquet has no usable item_id and ts"
            failures.append(Failure(table, column, "expect_column_to_exist", 0, len(df), message=message))
            continue
        arrow_type = arrow_schema.field(column).type
        if not _type_ok(arrow_type, kind):
            usable.discard(column)  # value expectations would fail obscurely on the wrong type
            failures.append(
                Failure(
                    table,
                    column,
                    "expect_column_values_to_be_of_type",
                    len(df),
                    len(df),
                    message=f"expected {kind}, got {arrow_type}",
                )
            )
    return df, usable


def _read(path: Path, columns: list[str], strings: list[str]) -> pd.DataFrame:
    """Read ``columns`` with the ``strings`` among them as pandas categoricals.

    GX null-tests and factorizes each column several times (its batch fingerprint alone hashes the whole
    frame), which on integer codes is several times cheaper than on Python strings. Encoding once after
    combining the chunks is the cheap way there: parquet's own ``read_dictionary`` builds one dictionary
    per row group and pandas then unifies them, which was 5x slower than a plain read at 10M events.
    """
    table = pq.read_table(path, columns=columns)
    for name in strings:
        # large_string: one chunk of a string column must stay under 2 GiB of characters
        encoded = table[name].cast(pa.large_string()).combine_chunks().dictionary_encode()
        table = table.set_column(table.schema.get_field_index(name), name, encoded)
    return table.to_pandas()


def _expected_types(table: str, names: list[str]) -> dict[str, str]:
    """Required columns (the contract's, see schema.REQUIRED_SCHEMAS) and present optional ones, each with
    the kind of type it must have. Nullable contract columns (brand_id, title, ...) must still exist."""
    types = {f.name: _kind(f.type) for f in schema.REQUIRED_SCHEMAS[table]}
    if table == schema.EVENTS and schema.EVENTS_LABEL.name in names:
        types[schema.EVENTS_LABEL.name] = _INTEGER
    if table == schema.ITEM_STATS:
        types |= {c: _NUMBER for c in names if c.startswith(STAT_PREFIX)}
    return types


# Free-text and optional-reference columns of items: only their presence and type are checked, so their
# values are not read (titles alone can be most of the file).
_TYPE_ONLY = {schema.ITEMS: {"brand_id", "shop_id", "title", "image_uri"}}


def _columns_to_read(table: str, arrow_schema: pa.Schema, expected: dict[str, str]) -> list[str]:
    """The columns some value expectation looks at; users' profile columns and extras are not read."""
    skip = _TYPE_ONLY.get(table, set())
    columns = [c for c in arrow_schema.names if c in expected and c not in skip]
    if table == schema.ITEMS:  # static numeric statistics (price, runtime, ...): any numeric extra column
        columns += [
            f.name
            for f in arrow_schema
            if f.name not in expected and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        ]
    return list(dict.fromkeys(columns))  # a file may repeat a name; read it once


def _is_string(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _kind(arrow_type: pa.DataType) -> str:
    if pa.types.is_timestamp(arrow_type):
        return _TIMESTAMP
    if pa.types.is_integer(arrow_type):
        return _INTEGER
    return _STRING if pa.types.is_string(arrow_type) else _NUMBER


def _type_ok(arrow_type: pa.DataType, kind: str) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_null(arrow_type):
        return True  # an all-null column has no type of its own; the not-null checks speak for it
    if kind == _STRING:
        return _is_string(arrow_type)
    if kind == _TIMESTAMP:
        return pa.types.is_timestamp(arrow_type) and arrow_type.tz in ("UTC", "Etc/UTC", "+00:00", "Z")
    if kind == _INTEGER:
        return pa.types.is_integer(arrow_type)
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
