"""The canonical contract: required columns, canonical types, optional tables, image paths."""

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from marn.data import importing
from marn.data.schema import (
    EVENTS,
    ITEMS,
    ITEMS_SCHEMA,
    TS,
    Dataset,
    SchemaError,
    conform,
    first_seen,
    item_stat_columns,
    read_dataset,
    read_table,
    resolve_image_uri,
    with_first_seen,
    write_dataset,
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


# --- first_seen derived from events -----------------------------------------------------------------------

# Item a has three events out of order, b one event given with an offset, c none; ids repeat across users.
FS_EVENTS = pd.DataFrame(
    {
        "user_id": ["u1", "u2", "u1", "u3", "u2"],
        "item_id": ["a", "b", "a", "a", "b"],
        "behavior": ["click", "click", "cart", "purchase", "cart"],
        "ts": pd.to_datetime(
            [
                "2025-01-03T08:00:00Z",
                "2025-01-02T12:00:00.000001+02:00",  # 10:00:00.000001 UTC: microseconds survive
                "2025-01-01T09:30:00Z",
                "2025-01-05T00:00:00Z",
                "2025-01-04T00:00:00Z",
            ],
            utc=True,
            format="ISO8601",
        ),
    }
)
FS_ITEMS = ITEMS_DF.drop(columns=["first_seen"]).assign(item_id=["a", "b"])
FS_ITEMS = pd.concat([FS_ITEMS, FS_ITEMS.iloc[[0]].assign(item_id="c")], ignore_index=True)


def _expected_first_seen(events: pd.DataFrame, item_ids: list[str]) -> list[pd.Timestamp | None]:
    """The per-item minimum event ts, computed naively, None for an item without events."""
    out = []
    for item in item_ids:
        times = [t for i, t in zip(events["item_id"], events["ts"], strict=True) if i == item]
        out.append(min(times) if times else None)
    return out


def _write_items_without_first_seen(data_dir: Path, items: pd.DataFrame) -> None:
    # write_table would refuse it: a user's own parquet file, as a source without first_seen leaves it
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), data_dir / "items.parquet")


def test_read_dataset_derives_first_seen_from_events(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_table(tmp_path, EVENTS, FS_EVENTS)
    _write_items_without_first_seen(tmp_path, FS_ITEMS)
    with caplog.at_level(logging.INFO, logger="marn.data.schema"):
        items = read_dataset(tmp_path).items
    assert items["item_id"].tolist() == ["a", "b", "c"]
    assert str(items["first_seen"].dtype) == "datetime64[us, UTC]"
    assert items["first_seen"].tolist()[:2] == [
        pd.Timestamp("2025-01-01T09:30:00Z"),
        pd.Timestamp("2025-01-02T10:00:00.000001Z"),
    ]
    assert items["first_seen"].tolist()[:2] == _expected_first_seen(FS_EVENTS, ["a", "b"])
    assert pd.isna(items.loc[2, "first_seen"])  # c has no event
    pd.testing.assert_frame_equal(items.drop(columns=["first_seen"]), read_table(tmp_path, ITEMS))
    derived = [r for r in caplog.records if "first_seen derived from events" in r.getMessage()]
    assert len(derived) == 1 and derived[0].levelno == logging.INFO
    assert "2 of 3 items" in derived[0].getMessage()


def test_read_dataset_keeps_a_sources_own_first_seen(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_table(tmp_path, EVENTS, FS_EVENTS)
    own = FS_ITEMS.assign(first_seen=pd.Timestamp("2020-01-01", tz="UTC"))
    write_table(tmp_path, ITEMS, own)
    with caplog.at_level(logging.INFO, logger="marn.data.schema"):
        items = read_dataset(tmp_path).items
    assert (items["first_seen"] == pd.Timestamp("2020-01-01", tz="UTC")).all()
    assert "derived" not in caplog.text


def test_write_dataset_derives_first_seen(tmp_path: Path):
    events = FS_EVENTS.assign(ts=FS_EVENTS["ts"].dt.tz_convert("Europe/Berlin"))  # any zone, same instants
    write_dataset(tmp_path, Dataset(events=events, items=FS_ITEMS))
    table = pq.read_table(tmp_path / "items.parquet")
    assert table.schema.field("first_seen").type == TS
    assert table.column_names.index("first_seen") == ITEMS_SCHEMA.names.index("first_seen")
    got = table.column("first_seen").to_pylist()
    want = _expected_first_seen(FS_EVENTS, ["a", "b", "c"])
    assert got == [None if w is None else w.to_pydatetime() for w in want]


def test_derived_first_seen_is_utc_microseconds():
    events = FS_EVENTS.assign(ts=FS_EVENTS["ts"].dt.tz_convert("Europe/Berlin").dt.as_unit("ns"))
    got = with_first_seen(FS_ITEMS, events)["first_seen"]
    assert str(got.dtype) == "datetime64[us, UTC]"
    assert got.tolist()[:2] == _expected_first_seen(FS_EVENTS, ["a", "b"]) and pd.isna(got[2])
    assert with_first_seen(ITEMS_DF, events) is ITEMS_DF  # a source's own first_seen is kept as it is


def test_derived_first_seen_matches_ids_in_canonical_form(tmp_path: Path):
    events = FS_EVENTS.assign(item_id=[1, 2, 1, 1, 2])  # integer ids, as a user's frame may hold them
    items = FS_ITEMS.assign(item_id=["1", "2", "3"])
    write_dataset(tmp_path, Dataset(events=events, items=items))
    got = read_dataset(tmp_path).items["first_seen"]
    assert got.tolist()[:2] == _expected_first_seen(FS_EVENTS, ["a", "b"])
    assert got.isna().tolist() == [False, False, True]


def test_conform_alone_cannot_derive_first_seen(tmp_path: Path):
    pattern = (
        r"items: missing required column\(s\) \['first_seen'\].*"
        r"write_dataset and read_dataset derive it from them"
    )
    with pytest.raises(SchemaError, match=pattern):
        conform(ITEMS, FS_ITEMS)
    with pytest.raises(SchemaError, match=pattern):
        write_table(tmp_path, ITEMS, FS_ITEMS)
    with pytest.raises(SchemaError) as info:  # other tables' messages say nothing of events
        conform(ITEMS, ITEMS_DF.drop(columns=["title"]))
    assert "derive" not in str(info.value)


def test_first_seen_is_still_importable_from_importing():
    assert importing.first_seen is first_seen
    assert first_seen(FS_EVENTS).to_dict() == {
        "a": pd.Timestamp("2025-01-01T09:30:00Z"),
        "b": pd.Timestamp("2025-01-02T10:00:00.000001Z"),
    }
