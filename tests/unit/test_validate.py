"""Data validation: a clean canonical dataset passes; each kind of poisoned data is named in the report."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from marn.config import ValidateConfig, load_config
from marn.data import schema
from marn.stages import validate_stage
from marn.validate.dataset import check_dataset, validate_dataset
from marn.validate.report import DataValidationError, ValidationReport

NOW = datetime(2025, 6, 1, tzinfo=UTC)
CFG = ValidateConfig()


def _events(n: int = 40) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [f"u{i % 5}" for i in range(n)],
            "item_id": [f"i{i % 8}" for i in range(n)],
            "behavior": [schema.BEHAVIORS[i % 3] for i in range(n)],
            "ts": pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(range(n), unit="h"),
            "label": [i % 2 for i in range(n)],
        }
    )


def _items(n: int = 8) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n)],
            "category_id": [f"c{i % 3}" for i in range(n)],
            "brand_id": [None] * n,
            "shop_id": [f"s{i % 2}" for i in range(n)],
            "title": [f"item {i}" for i in range(n)],
            "image_uri": [f"images/i{i}.png" for i in range(n)],
            "first_seen": pd.Timestamp("2024-12-01", tz="UTC"),
            "price": [float(i) + 0.5 for i in range(n)],
            "n_reviews": list(range(n)),
        }
    )


def _write(tmp_path: Path, events: pd.DataFrame | None = None, items: pd.DataFrame | None = None) -> Path:
    schema.write_table(tmp_path, schema.EVENTS, _events() if events is None else events)
    schema.write_table(tmp_path, schema.ITEMS, _items() if items is None else items)
    return tmp_path


def _with(df: pd.DataFrame, row: int, column: str, value: object) -> pd.DataFrame:
    df = df.copy()
    df[column] = df[column].astype(object)
    df.at[row, column] = value
    return df


def test_clean_dataset_passes(tmp_path: Path) -> None:
    report = validate_dataset(_write(tmp_path), CFG, now=NOW)
    assert report.success, report.to_text()
    assert report.failures == []
    assert report.row_counts == {"events": 40, "items": 8}
    assert "PASSED" in report.to_text()
    assert check_dataset(tmp_path, CFG, now=NOW).success


def test_clean_dataset_with_optional_tables_passes(tmp_path: Path) -> None:
    _write(tmp_path)
    schema.write_table(tmp_path, schema.USERS, pd.DataFrame({"user_id": ["u0", "u1"], "age": [30, 40]}))
    stats = pd.DataFrame(
        {"item_id": ["i0", "i1"], "ts": pd.Timestamp("2025-01-02", tz="UTC"), "n_click": [1, 0]}
    )
    schema.write_table(tmp_path, schema.ITEM_STATS, stats)
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert report.success, report.to_text()
    assert report.row_counts == {"events": 40, "items": 8, "users": 2, "item_stats": 2}


# (what to poison, expected table.column, expected expectation, bad rows)
Poison = Callable[[pd.DataFrame, pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]]
POISONS: dict[str, tuple[Poison, str, str, int]] = {
    "null_user_ids": (
        lambda e, i: (_with(_with(_with(e, 3, "user_id", None), 4, "user_id", None), 5, "user_id", None), i),
        "events.user_id",
        "expect_column_values_to_not_be_null",
        3,
    ),
    "future_ts": (
        lambda e, i: (_with(e, 7, "ts", pd.Timestamp("2025-06-02", tz="UTC")), i),
        "events.ts",
        "expect_column_values_to_be_between",
        1,
    ),
    "ts_before_earliest": (
        lambda e, i: (_with(e, 2, "ts", pd.Timestamp("1970-01-01", tz="UTC")), i),
        "events.ts",
        "expect_column_values_to_be_between",
        1,
    ),
    "unknown_behavior": (
        lambda e, i: (_with(e, 1, "behavior", "teleport"), i),
        "events.behavior",
        "expect_column_values_to_be_in_set",
        1,
    ),
    "label_2": (
        lambda e, i: (_with(e, 6, "label", 2), i),
        "events.label",
        "expect_column_values_to_be_in_set",
        1,
    ),
    "duplicate_events": (
        lambda e, i: (pd.concat([e, e.iloc[[4]]], ignore_index=True), i),
        "events.user_id,item_id,behavior,ts",
        "expect_compound_columns_to_be_unique",
        2,  # both copies of the duplicated event
    ),
    "event_item_not_in_items": (
        lambda e, i: (_with(e, 9, "item_id", "i-ghost"), i),
        "events.item_id",
        "expect_column_values_to_be_in_set",
        1,
    ),
    "duplicate_item_ids": (
        lambda e, i: (e, pd.concat([i, i.iloc[[1]]], ignore_index=True)),
        "items.item_id",
        "expect_column_values_to_be_unique",
        2,
    ),
    "negative_price": (
        lambda e, i: (e, _with(i, 3, "price", -1.0)),
        "items.price",
        "expect_column_values_to_be_between",
        1,
    ),
    "null_category": (
        lambda e, i: (e, _with(i, 0, "category_id", None)),
        "items.category_id",
        "expect_column_values_to_not_be_null",
        1,
    ),
    "first_seen_in_future": (
        lambda e, i: (e, _with(i, 0, "first_seen", pd.Timestamp("2030-01-01", tz="UTC"))),
        "items.first_seen",
        "expect_column_values_to_be_between",
        1,
    ),
}


@pytest.mark.parametrize("kind", sorted(POISONS))
def test_poisoned_data_is_caught(tmp_path: Path, kind: str) -> None:
    poison, where, expectation, bad = POISONS[kind]
    events, items = poison(_events(), _items())
    report = validate_dataset(_write(tmp_path, events, items), CFG, now=NOW)
    assert not report.success
    text = report.to_text()
    assert f"{where}: {expectation}" in text, text
    [failure] = [f for f in report.failures if f.where == where and f.expectation == expectation]
    assert failure.unexpected_count == bad, text
    assert failure.total_rows == len(events if where.startswith("events") else items)
    assert f"{bad} of {failure.total_rows} rows" in text
    assert 1 <= len(failure.examples) <= CFG.max_bad_examples
    assert len(report.failures) == 1, text  # nothing else is flagged by this one defect


def test_examples_show_the_bad_rows(tmp_path: Path) -> None:
    events = _with(_events(), 9, "item_id", "i-ghost")
    report = validate_dataset(_write(tmp_path, events), CFG, now=NOW)
    [failure] = report.failures
    assert failure.examples == [
        {
            "row": 9,
            "user_id": "u4",
            "item_id": "i-ghost",
            "behavior": "click",
            "ts": "2025-01-01T09:00:00+00:00",
        }
    ]
    assert "items.item_id" in failure.message


def test_examples_are_capped(tmp_path: Path) -> None:
    events = _events()
    events["user_id"] = None
    report = validate_dataset(_write(tmp_path, events), ValidateConfig(max_bad_examples=2), now=NOW)
    failure = next(f for f in report.failures if f.where == "events.user_id")
    assert failure.unexpected_count == 40
    assert len(failure.examples) == 2


def test_future_slack_tolerates_clock_skew(tmp_path: Path) -> None:
    events = _with(_events(), 0, "ts", pd.Timestamp(NOW) + pd.Timedelta(seconds=60))
    _write(tmp_path, events)
    assert validate_dataset(tmp_path, ValidateConfig(future_slack_s=300), now=NOW).success
    report = validate_dataset(tmp_path, ValidateConfig(future_slack_s=0), now=NOW)
    assert [f.where for f in report.failures] == ["events.ts"]


def test_naive_now_is_utc(tmp_path: Path) -> None:
    report = validate_dataset(_write(tmp_path), CFG, now=datetime(2025, 6, 1))
    assert report.success, report.to_text()
    assert report.now == "2025-06-01T00:00:00+00:00"


def test_missing_events_file(tmp_path: Path) -> None:
    schema.write_table(tmp_path, schema.ITEMS, _items())
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert not report.success
    [failure] = report.failures
    assert (failure.table, failure.column, failure.expectation) == (
        "events",
        None,
        "expect_table_file_to_exist",
    )
    assert "events.parquet" in report.to_text()
    assert report.row_counts == {"items": 8}


def test_missing_required_column(tmp_path: Path) -> None:
    _write(tmp_path)
    pq.write_table(pa.Table.from_pandas(_events().drop(columns=["behavior"])), tmp_path / "events.parquet")
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert not report.success
    [failure] = report.failures  # the other events checks still run and pass
    assert failure.where == "events.behavior"
    assert "events.behavior: expect_column_to_exist" in report.to_text()


def test_wrong_dtype(tmp_path: Path) -> None:
    _write(tmp_path)
    events = _events()
    events["ts"] = events["ts"].astype(str)  # ISO text instead of a timestamp
    events["user_id"] = range(len(events))  # integer ids
    pq.write_table(pa.Table.from_pandas(events), tmp_path / "events.parquet")
    report = validate_dataset(tmp_path, CFG, now=NOW)
    text = report.to_text()
    assert {f.where for f in report.failures} == {"events.ts", "events.user_id"}, text
    assert "events.ts: expect_column_values_to_be_of_type" in text
    assert "expected UTC timestamp, got string" in text
    assert "expected string, got int64" in text


def test_naive_timestamps_are_a_type_failure(tmp_path: Path) -> None:
    _write(tmp_path)
    events = _events()
    events["ts"] = events["ts"].dt.tz_localize(None)
    pq.write_table(pa.Table.from_pandas(events), tmp_path / "events.parquet")
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert [f.where for f in report.failures] == ["events.ts"]
    assert "expected UTC timestamp" in report.to_text()


def test_unreadable_file_is_a_failure(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "items.parquet").write_bytes(b"not parquet")
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert [(f.table, f.expectation) for f in report.failures] == [
        ("items", "expect_table_file_to_be_readable")
    ]


def test_empty_events_fail(tmp_path: Path) -> None:
    report = validate_dataset(_write(tmp_path, _events().iloc[:0]), CFG, now=NOW)
    assert [f.expectation for f in report.failures] == ["expect_table_row_count_to_be_between"]


def test_optional_tables_are_checked(tmp_path: Path) -> None:
    _write(tmp_path)
    schema.write_table(tmp_path, schema.USERS, pd.DataFrame({"user_id": ["u0", "u0", None]}))
    stats = pd.DataFrame(
        {"item_id": ["i0", None], "ts": pd.Timestamp("2025-01-02", tz="UTC"), "n_click": [1, -3]}
    )
    schema.write_table(tmp_path, schema.ITEM_STATS, stats)
    report = validate_dataset(tmp_path, CFG, now=NOW)
    got = {(f.where, f.expectation) for f in report.failures}
    assert got == {
        ("users.user_id", "expect_column_values_to_not_be_null"),
        ("users.user_id", "expect_column_values_to_be_unique"),
        ("item_stats.item_id", "expect_column_values_to_not_be_null"),
        ("item_stats.n_click", "expect_column_values_to_be_between"),
    }, report.to_text()


def test_the_pipeline_gate_writes_the_report_then_raises_with_it(tmp_path: Path) -> None:
    """marn.stages.validate_stage once passed the report's text where DataValidationError takes the report,
    so bad data failed the run with an AttributeError instead."""
    data = _write(tmp_path / "data", _with(_events(), 0, "user_id", None))
    html = tmp_path / "out" / "report.html"
    with pytest.raises(DataValidationError, match=r"events\.user_id") as info:
        validate_stage(data, load_config(None), html)
    assert not info.value.report.success
    assert "events" in html.read_text() and "FAILED" in html.read_text()


def test_check_dataset_raises_with_report(tmp_path: Path) -> None:
    _write(tmp_path, _with(_events(), 0, "user_id", None))
    with pytest.raises(DataValidationError, match=r"events\.user_id") as info:
        check_dataset(tmp_path, CFG, now=NOW)
    assert isinstance(info.value.report, ValidationReport)
    assert not info.value.report.success


def test_html_escapes_values(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script>"
    report = validate_dataset(_write(tmp_path, _with(_events(), 0, "behavior", evil)), CFG, now=NOW)
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "expect_column_values_to_be_in_set" in page and "FAILED" in page
    assert "<script>" not in validate_dataset(tmp_path, CFG, now=NOW).to_html()
    assert "All expectations met" in validate_dataset(_write(tmp_path), CFG, now=NOW).to_html()


def test_to_dict_is_json_serialisable(tmp_path: Path) -> None:
    events = _with(_events(), 7, "ts", pd.Timestamp("2026-01-01", tz="UTC"))
    events = pd.concat([events, events.iloc[[3]]], ignore_index=True)
    items = _with(_items(), 3, "price", float("-inf"))
    report = validate_dataset(_write(tmp_path, events, items), CFG, now=NOW)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["success"] is False
    assert {f["expectation"] for f in data["failures"]} == {
        "expect_column_values_to_be_between",
        "expect_compound_columns_to_be_unique",
    }
    assert data["row_counts"] == {"events": 41, "items": 8}


def test_no_progress_bars_or_info_logs(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    validate_dataset(_write(tmp_path), CFG, now=NOW)
    out, err = capfd.readouterr()
    assert "Calculating Metrics" not in out + err
    assert "ephemeral docs site" not in out + err


def test_missing_nullable_contract_column(tmp_path: Path) -> None:
    _write(tmp_path)
    pq.write_table(pa.Table.from_pandas(_items().drop(columns=["title"])), tmp_path / "items.parquet")
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert [(f.where, f.expectation) for f in report.failures] == [("items.title", "expect_column_to_exist")]


def test_dictionary_encoded_strings_are_accepted(tmp_path: Path) -> None:
    _write(tmp_path)
    events = _with(_events(), 5, "item_id", "i-ghost")
    for column in ("user_id", "item_id", "behavior"):
        events[column] = events[column].astype("category")  # written as arrow dictionary columns
    pq.write_table(pa.Table.from_pandas(events), tmp_path / "events.parquet")
    report = validate_dataset(tmp_path, CFG, now=NOW)
    [failure] = report.failures
    assert (failure.where, failure.unexpected_count) == ("events.item_id", 1)
    assert failure.examples[0]["item_id"] == "i-ghost"


def test_import_does_not_load_great_expectations() -> None:
    code = "import sys, marn.validate.dataset; sys.exit('great_expectations' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


# --- items without first_seen: read_dataset derives it from the events ----------------------------------


def _write_items_without_first_seen(tmp_path: Path, events: pd.DataFrame | None = None) -> Path:
    """A dataset whose items.parquet lacks first_seen (a user's own file: write_table would refuse it)."""
    _write(tmp_path, events)
    items = _items().drop(columns=["first_seen"])
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), tmp_path / "items.parquet")
    assert "first_seen" not in pq.read_schema(tmp_path / "items.parquet").names
    return tmp_path


def test_items_without_first_seen_pass_with_good_events(tmp_path: Path) -> None:
    report = validate_dataset(_write_items_without_first_seen(tmp_path), CFG, now=NOW)
    assert report.success, report.to_text()
    assert report.row_counts == {"events": 40, "items": 8}
    # what every stage then reads: each item's first event
    items = schema.read_dataset(tmp_path).items.set_index("item_id")
    first = _events().groupby("item_id")["ts"].min()
    assert items["first_seen"].to_dict() == first.to_dict()


BAD_EVENTS: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], str, str]] = {
    "null_ts": (lambda e: _with(e, 3, "ts", None), "events.ts", "expect_column_values_to_not_be_null"),
    "unknown_behavior": (
        lambda e: _with(e, 1, "behavior", "teleport"),
        "events.behavior",
        "expect_column_values_to_be_in_set",
    ),
    "future_ts": (
        lambda e: _with(e, 7, "ts", pd.Timestamp("2030-01-01", tz="UTC")),
        "events.ts",
        "expect_column_values_to_be_between",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_EVENTS))
def test_items_without_first_seen_fail_on_bad_events(tmp_path: Path, kind: str) -> None:
    poison, where, expectation = BAD_EVENTS[kind]
    report = validate_dataset(_write_items_without_first_seen(tmp_path, poison(_events())), CFG, now=NOW)
    assert not report.success
    assert [(f.where, f.expectation, f.unexpected_count) for f in report.failures] == [
        (where, expectation, 1)
    ]
    assert f"{where}: {expectation}" in report.to_text()
    with pytest.raises(DataValidationError, match=where.replace(".", r"\.")):
        check_dataset(tmp_path, CFG, now=NOW)


def test_items_without_first_seen_fail_when_events_cannot_derive_it(tmp_path: Path) -> None:
    _write_items_without_first_seen(tmp_path)
    events = _events()
    events["ts"] = events["ts"].astype(str)  # no usable ts: first_seen cannot be derived
    pq.write_table(pa.Table.from_pandas(events), tmp_path / "events.parquet")
    report = validate_dataset(tmp_path, CFG, now=NOW)
    got = {(f.where, f.expectation) for f in report.failures}
    assert got == {
        ("events.ts", "expect_column_values_to_be_of_type"),
        ("items.first_seen", "expect_column_to_exist"),
    }, report.to_text()
    assert "cannot be derived" in report.to_text()


def test_items_without_first_seen_fail_without_events(tmp_path: Path) -> None:
    _write_items_without_first_seen(tmp_path)
    (tmp_path / "events.parquet").unlink()
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert {(f.table, f.column, f.expectation) for f in report.failures} == {
        ("events", None, "expect_table_file_to_exist"),
        ("items", "first_seen", "expect_column_to_exist"),
    }, report.to_text()


def test_a_sources_own_first_seen_is_still_checked(tmp_path: Path) -> None:
    # items carry their own first_seen: it is checked even though events could have given one
    items = _with(_items(), 2, "first_seen", pd.Timestamp("2030-01-01", tz="UTC"))
    report = validate_dataset(_write(tmp_path, items=items), CFG, now=NOW)
    assert [(f.where, f.expectation) for f in report.failures] == [
        ("items.first_seen", "expect_column_values_to_be_between")
    ]


def test_write_dataset_output_validates(tmp_path: Path) -> None:
    # write_dataset derives first_seen into the file; the file's own check then runs on it and passes
    items = _items().drop(columns=["first_seen"])
    schema.write_dataset(tmp_path, schema.Dataset(events=_events(), items=items))
    assert "first_seen" in pq.read_schema(tmp_path / "items.parquet").names
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert report.success, report.to_text()


def test_item_stats_that_count_events_at_or_after_their_stamp_are_a_leak(tmp_path: Path) -> None:
    """The contract: the snapshot stamped D counts only events before D. Counts stamped a day early (they
    include the day's own events) would hand every sample of that day its own click."""
    from marn.data.stats import daily_item_stats

    _write(tmp_path)
    honest = daily_item_stats(_events())
    schema.write_table(tmp_path, schema.ITEM_STATS, honest)
    report = validate_dataset(tmp_path, CFG, now=NOW)
    assert report.success, report.to_text()
    leaky = honest.assign(ts=honest["ts"] - pd.Timedelta(days=1))
    schema.write_table(tmp_path, schema.ITEM_STATS, leaky)
    report = validate_dataset(tmp_path, CFG, now=NOW)
    failures = [f for f in report.failures if f.where.startswith("item_stats")]
    assert failures and all(f.expectation == "expect_column_values_to_be_in_set" for f in failures)
    assert "point-in-time leak" in report.to_text()
