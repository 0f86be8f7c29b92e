"""The canonical contract: required columns, canonical types, optional tables, image paths."""

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from marn.data.schema import (
    EVENTS,
    ITEMS,
    SchemaError,
    conform,
    item_stat_columns,
    read_dataset,
    read_table,
    resolve_image_uri,
    write_table,
)
from marn.data.stats import daily_item_stats, stats_as_of

EVENTS_DF = pd.DataFrame(
    {
        "user_id": [1, 2],  # ints become strings
        "item_id": ["a", "b"],
        "behavior": ["click", "cart"],
        "ts": ["2025-01-01T00:00:00Z", "2025-01-02T12:00:00+02:00"],
        "label": [1, 0],
    }
)
ITEMS_DF = pd.DataFrame(
    {
        "item_id": ["a", "b"],
        "category_id": ["c", "c"],
        "brand_id": [None, "x"],
        "shop_id": [None, None],
        "title": ["red tutu", None],
        "image_uri": ["images/a.png", "/abs/b.jpg"],
        "first_seen": pd.to_datetime(["2024-12-01", "2024-12-02"], utc=True),
        "price": [9.5, None],
        "is_new": [True, False],
    }
)


def test_conform_orders_columns_and_casts_to_canonical_types():
    table = conform(EVENTS, EVENTS_DF)
    assert table.column_names == ["user_id", "item_id", "behavior", "ts", "label"]
    assert table.schema.field("user_id").type == pa.string()
    assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("label").type == pa.int8()
    assert table.column("ts")[1].as_py() == pd.Timestamp("2025-01-02T10:00:00Z").to_pydatetime()


def test_conform_names_the_missing_or_unconvertible_column():
    with pytest.raises(SchemaError, match=r"events: missing required column\(s\) \['ts'\]"):
        conform(EVENTS, EVENTS_DF.drop(columns=["ts"]))
    with pytest.raises(SchemaError, match=r"events\.ts"), pytest.warns(UserWarning):
        conform(EVENTS, EVENTS_DF.assign(ts=["not a time", "x"]))


def test_round_trip_and_optional_tables(tmp_path: Path):
    write_table(tmp_path, EVENTS, EVENTS_DF)
    write_table(tmp_path, ITEMS, ITEMS_DF)
    data = read_dataset(tmp_path)
    assert data.users is None and data.item_stats is None
    assert data.events["user_id"].tolist() == ["1", "2"]
    assert item_stat_columns(data.items) == ["price", "is_new"]
    with pytest.raises(FileNotFoundError, match=r"events\.parquet"):
        read_table(tmp_path / "empty", EVENTS)


def test_image_uris_resolve_relative_to_the_dataset(tmp_path: Path):
    assert resolve_image_uri(tmp_path, "images/a.png") == tmp_path / "images" / "a.png"
    assert resolve_image_uri(tmp_path, "/abs/b.jpg") == Path("/abs/b.jpg")
    assert resolve_image_uri(tmp_path, None) is None and resolve_image_uri(tmp_path, "") is None


def test_item_stats_are_point_in_time():
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3", "u1"],
            "item_id": ["a", "a", "a", "b"],
            "behavior": ["click", "click", "purchase", "click"],
            "ts": pd.to_datetime(
                ["2025-01-01 10:00", "2025-01-01 23:00", "2025-01-03 08:00", "2025-01-02 09:00"], utc=True
            ),
        }
    )
    stats = daily_item_stats(events)
    keys = pd.DataFrame(
        {
            "item_id": ["a", "a", "a", "a", "b", "zzz"],
            "ts": pd.to_datetime(
                [
                    "2025-01-01 23:30",
                    "2025-01-02 00:00",
                    "2025-01-03 09:00",
                    "2025-01-04 00:00",
                    "2025-01-05 00:00",
                    "2025-02-01 00:00",
                ],
                utc=True,
            ),
        }
    )
    got = stats_as_of(stats, keys)
    # Same-day events are never visible; a snapshot at D 00:00 counts days before D only.
    assert got["n_events"].tolist() == [0, 2, 2, 3, 1, 0]
    assert got["n_purchase"].tolist() == [0, 0, 0, 1, 0, 0]
    assert got["n_click"].tolist() == [0, 2, 2, 2, 1, 0]
