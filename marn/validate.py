"""Data validation of a canonical dataset with Great Expectations (GX Core 1.x) before anything trains on it.

Two layers, one report:

- Structure, checked here from the parquet files and their arrow schemas (cheap, and GX cannot run on a
  column that is absent or has the wrong type): every required table file exists and is readable, every
  required column exists, ids are strings, timestamps are UTC timestamps, counts are numeric.
- Values, checked by one GX expectation suite per table, run once on the whole table through an ephemeral
  context: nulls, ranges, allowed sets, uniqueness, and events pointing at unknown items.

Both layers produce :class:`Failure` entries naming table, column and expectation, with a few bad rows, so
a pipeline step can stop on failure (:func:`check_dataset`) and publish ``to_html()`` as an artifact.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from marn.config import ValidateConfig
from marn.data import schema
from marn.data.stats import STAT_PREFIX

log = logging.getLogger(__name__)

# A helper column added to the events frame: True where item_id is known to items (or null, which the
# not-null expectation reports), computed with one hash lookup per distinct id. GX then checks one boolean
# column: handing GX the whole catalogue as a value_set took 11 s for 1M events and 100k items (~150x the
# lookup) and grows with the catalogue.
_KNOWN_ITEM = "__item_id_in_items"
_PAST_ONLY = "__counts_only_earlier_events"

# Columns shown with every bad row so the row can be found again (besides the failing column).
_KEY_COLUMNS = {
    schema.EVENTS: ("user_id", "item_id", "behavior", "ts"),
    schema.ITEMS: ("item_id",),
    schema.USERS: ("user_id",),
    schema.ITEM_STATS: ("item_id", "ts"),
}

_STRING, _TIMESTAMP, _INTEGER, _NUMBER = "string", "UTC timestamp", "integer", "number"


@dataclass
class Failure:
    """One failed expectation. ``column`` is None for table-level checks (file, row count); it joins the
    columns of a compound check with commas. Each example is a bad row as ``{"row": position in the file,
    key columns..., failing column}`` with JSON values."""

    table: str
    column: str | None
    expectation: str
    unexpected_count: int
    total_rows: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""

    @property
    def where(self) -> str:
        return self.table if self.column is None else f"{self.table}.{self.column}"

    def to_text(self) -> str:
        text = f"{self.where}: {self.expectation}"
        if self.unexpected_count:  # structural failures (file, column, type) have no row count
            text += f" — {self.unexpected_count} of {self.total_rows} rows"
        if self.message:
            text += f" ({self.message})"
        if self.examples:
            text += "; examples: " + "; ".join(json.dumps(e, default=str) for e in self.examples)
        return text


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset`; ``success`` is True exactly when ``failures`` is empty."""

    success: bool
    failures: list[Failure]
    row_counts: dict[str, int]  # rows per table that could be read
    elapsed_s: float
    data_dir: str = ""
    now: str = ""  # the reference time for "not in the future", ISO 8601

    def to_text(self) -> str:
        status = "PASSED" if self.success else f"FAILED ({len(self.failures)} failed expectation(s))"
        counts = ", ".join(f"{t}={n}" for t, n in self.row_counts.items()) or "no tables read"
        lines = [f"data validation {status}: {self.data_dir} [{counts}] in {self.elapsed_s:.2f}s"]
        lines += [f"  {f.to_text()}" for f in self.failures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # examples already hold only JSON types (see _json_value)

    def to_html(self) -> str:
        """A self-contained page (inline CSS, no scripts); every data value is escaped."""
        e = html.escape
        status = "PASSED" if self.success else "FAILED"
        color = "#1a7f37" if self.success else "#cf222e"
        counts = "".join(f"<tr><td>{e(t)}</td><td>{n}</td></tr>" for t, n in self.row_counts.items())
        rows = []
        for f in self.failures:
            examples = "\n".join(json.dumps(x, default=str) for x in f.examples)
            rows.append(
                "<tr>"
                f"<td>{e(f.table)}</td><td>{e(f.column or '')}</td><td>{e(f.expectation)}</td>"
                f"<td>{f.unexpected_count}</td><td>{f.total_rows}</td><td>{e(f.message)}</td>"
                f"<td><pre>{e(examples)}</pre></td>"
                "</tr>"
            )
        failures = (
            "<table><tr><th>table</th><th>column</th><th>expectation</th><th>unexpected</th><th>rows</th>"
            "<th>details</th><th>examples</th></tr>" + "".join(rows) + "</table>"
            if rows
            else "<p>All expectations met.</p>"
        )
        return (
            "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>MARN data validation</title>"
            "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
            "pre{margin:0;white-space:pre-wrap;font-size:85%}</style></head><body>"
            f"<h1>Data validation: <span style='color:{color}'>{status}</span></h1>"
            f"<p>Dataset <code>{e(self.data_dir)}</code>, checked against now={e(self.now)}, "
            f"{len(self.failures)} failed expectation(s), {self.elapsed_s:.2f} s.</p>"
            f"<h2>Rows</h2><table><tr><th>table</th><th>rows</th></tr>{counts}</table>"
            f"<h2>Failures</h2>{failures}</body></html>\n"
        )


class DataValidationError(Exception):
    """The dataset failed validation; ``report`` holds every failure."""

    def __init__(self, report: ValidationReport) -> None:
        super().__init__(report.to_text())
        self.report = report


def check_dataset(data_dir: str | Path, cfg: ValidateConfig, now: datetime | None = None) -> ValidationReport:
    """Validate and raise DataValidationError on any failure (pipelines stop here)."""
    report = validate_dataset(data_dir, cfg, now)
    if not report.success:
        raise DataValidationError(report)
    return report


def validate_dataset(
    data_dir: str | Path, cfg: ValidateConfig, now: datetime | None = None
) -> ValidationReport:
    """Validate every table of the canonical dataset in ``data_dir``; never raises on bad data."""
    start = time.perf_counter()
    data_dir = Path(data_dir)
    now_ts = _utc(now if now is not None else datetime.now(UTC))
    latest = now_ts + timedelta(seconds=cfg.future_slack_s)
    failures: list[Failure] = []
    frames: dict[str, pd.DataFrame] = {}
    usable: dict[str, set[str]] = {}  # per table: columns present with the right type

    for table in (schema.EVENTS, schema.ITEMS, schema.USERS, schema.ITEM_STATS):
        loaded = _load(data_dir, table, failures, _derivable(table, usable))
        if loaded is not None:
            frames[table], usable[table] = loaded

    suites = _build_suites(frames, usable, cfg, _utc(cfg.earliest_ts), latest)
    if suites:
        failures += _run_gx(suites, cfg.max_bad_examples)

    return ValidationReport(
        success=not failures,
        failures=failures,
        row_counts={t: len(df) for t, df in frames.items()},
        elapsed_s=time.perf_counter() - start,
        data_dir=str(data_dir),
        now=now_ts.isoformat(),
    )


# --- structure ------------------------------------------------------------------------------------------


def _derivable(table: str, usable: dict[str, set[str]]) -> set[str]:
    """Required columns that ``table`` may lack because :func:`marn.data.schema.read_dataset` derives them:
    items.first_seen, from events with a usable item_id and ts (events are loaded first). The derived
    values are the events' own ts, which the events suite checks, so nothing more is checked for them."""
    if table == schema.ITEMS and {"item_id", "ts"} <= usable.get(schema.EVENTS, set()):
        return {schema.FIRST_SEEN}
    return set()


def _load(
    data_dir: Path, table: str, failures: list[Failure], derivable: Collection[str] = ()
) -> tuple[pd.DataFrame, set[str]] | None:
    """Read one table and check its columns' presence and types; None when it is absent or unreadable.

    A missing column in ``derivable`` is no failure (see :func:`_derivable`)."""
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


# --- values ---------------------------------------------------------------------------------------------


@dataclass
class _Check:
    """One GX expectation and how its failure is reported."""

    expectation: Any  # a great_expectations.expectations.Expectation
    column: str | None  # reported column (None: table-level)
    name: str  # reported expectation name
    message: str = ""


@dataclass
class _Suite:
    table: str
    df: pd.DataFrame
    checks: list[_Check]


def _build_suites(
    frames: dict[str, pd.DataFrame],
    usable: dict[str, set[str]],
    cfg: ValidateConfig,
    earliest: pd.Timestamp,
    latest: pd.Timestamp,
) -> list[_Suite]:
    gxe = _import_gx().expectations

    suites = []
    bounds = f"allowed [{earliest.isoformat()}, {latest.isoformat()}]"
    future = f"not after {latest.isoformat()} (now + {cfg.future_slack_s}s)"

    def not_null(col: str) -> _Check:
        return _Check(
            gxe.ExpectColumnValuesToNotBeNull(column=col), col, "expect_column_values_to_not_be_null"
        )

    def non_negative(col: str) -> _Check:
        return _Check(
            gxe.ExpectColumnValuesToBeBetween(column=col, min_value=0),
            col,
            "expect_column_values_to_be_between",
            "must be >= 0",
        )

    def unique(col: str) -> _Check:
        return _Check(gxe.ExpectColumnValuesToBeUnique(column=col), col, "expect_column_values_to_be_unique")

    def has_rows() -> _Check:
        return _Check(
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            None,
            "expect_table_row_count_to_be_between",
            "the table must not be empty",
        )

    events, ok = frames.get(schema.EVENTS), usable.get(schema.EVENTS, set())
    if events is not None:
        checks = [has_rows()]
        checks += [not_null(c) for c in ("user_id", "item_id", "behavior", "ts") if c in ok]
        if "ts" in ok:
            checks.append(
                _Check(
                    gxe.ExpectColumnValuesToBeBetween(column="ts", min_value=earliest, max_value=latest),
                    "ts",
                    "expect_column_values_to_be_between",
                    bounds,
                )
            )
        if "behavior" in ok:
            checks.append(
                _Check(
                    gxe.ExpectColumnValuesToBeInSet(column="behavior", value_set=list(schema.BEHAVIORS)),
                    "behavior",
                    "expect_column_values_to_be_in_set",
                    f"allowed {list(schema.BEHAVIORS)}",
                )
            )
        if "label" in ok:
            checks.append(not_null("label"))
            checks.append(
                _Check(
                    gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
                    "label",
                    "expect_column_values_to_be_in_set",
                    "allowed [0, 1]",
                )
            )
        key = [c for c in ("user_id", "item_id", "behavior", "ts") if c in ok]
        if len(key) == 4:
            checks.append(
                _Check(
                    gxe.ExpectCompoundColumnsToBeUnique(column_list=key),
                    ",".join(key),
                    "expect_compound_columns_to_be_unique",
                    "duplicate events",
                )
            )
        items = frames.get(schema.ITEMS)
        if "item_id" in ok and items is not None and "item_id" in usable.get(schema.ITEMS, set()):
            # in place: the frame is ours, and a copy of 10M rows would cost more than the check
            events[_KNOWN_ITEM] = _known(events["item_id"], items["item_id"])
            checks.append(
                _Check(
                    gxe.ExpectColumnValuesToBeInSet(column=_KNOWN_ITEM, value_set=[True]),
                    "item_id",
                    "expect_column_values_to_be_in_set",
                    "item_id not found in items.item_id",
                )
            )
        suites.append(_Suite(schema.EVENTS, events, checks))

    items, ok = frames.get(schema.ITEMS), usable.get(schema.ITEMS, set())
    if items is not None:
        checks = [has_rows()]
        checks += [not_null(c) for c in ("item_id", "category_id") if c in ok]
        if "item_id" in ok:
            checks.append(unique("item_id"))
        # every static statistic of an item is a magnitude (price, runtime, counts); nulls are allowed
        checks += [non_negative(c) for c in _stat_columns(items) if c in ok]
        # a source's own first_seen; a derived one (column absent here) is the events' ts, checked above
        if schema.FIRST_SEEN in ok:
            checks.append(
                _Check(
                    gxe.ExpectColumnValuesToBeBetween(column=schema.FIRST_SEEN, max_value=latest),
                    schema.FIRST_SEEN,
                    "expect_column_values_to_be_between",
                    future,
                )
            )
        suites.append(_Suite(schema.ITEMS, items, checks))

    users, ok = frames.get(schema.USERS), usable.get(schema.USERS, set())
    if users is not None and "user_id" in ok:
        suites.append(_Suite(schema.USERS, users, [not_null("user_id"), unique("user_id")]))

    stats, ok = frames.get(schema.ITEM_STATS), usable.get(schema.ITEM_STATS, set())
    if stats is not None:
        checks = [not_null(c) for c in ("item_id", "ts") if c in ok]
        checks += [non_negative(c) for c in stats.columns if c.startswith(STAT_PREFIX) and c in ok]
        events, events_ok = frames.get(schema.EVENTS), usable.get(schema.EVENTS, set())
        counts = [c for c in stats.columns if c.startswith(STAT_PREFIX) and c in ok]
        if (
            {"item_id", "ts"} <= ok
            and counts
            and events is not None
            and {"item_id", "behavior", "ts"} <= events_ok
        ):
            # in place, as _KNOWN_ITEM: a snapshot may count only events strictly before its own time
            stats[_PAST_ONLY] = _counts_only_earlier_events(stats, events, counts)
            checks.append(
                _Check(
                    gxe.ExpectColumnValuesToBeInSet(column=_PAST_ONLY, value_set=[True]),
                    ",".join(counts),
                    "expect_column_values_to_be_in_set",
                    "counts more events than happened before the snapshot's ts (a point-in-time leak: "
                    "the row stamped day D may count only events before D)",
                )
            )
        if checks:
            suites.append(_Suite(schema.ITEM_STATS, stats, checks))
    return suites


def _counts_only_earlier_events(stats: pd.DataFrame, events: pd.DataFrame, counts: list[str]) -> np.ndarray:
    """True where every count of a snapshot row (``n_events``, ``n_<behaviour>``) is at most the number of
    the item's events (of that behaviour) strictly before the row's ts; rows with a null key pass (the
    not-null expectations report them). Counts of a behaviour the events never show are not bounded."""
    ok = np.ones(len(stats), dtype=bool)
    keyed = stats["item_id"].notna().to_numpy() & stats["ts"].notna().to_numpy()
    queries = pd.DataFrame(
        {
            "item_id": stats["item_id"].astype(str).to_numpy()[keyed],
            "ts": pd.to_datetime(stats["ts"][keyed], utc=True).dt.as_unit("us").reset_index(drop=True),
            "_row": np.flatnonzero(keyed),
        }
    ).sort_values("ts", kind="stable")
    valid = events["item_id"].notna() & events["ts"].notna()
    log = pd.DataFrame(
        {
            "item_id": events["item_id"][valid].astype(str).to_numpy(),
            "behavior": events["behavior"][valid].astype(str).to_numpy(),
            "ts": pd.to_datetime(events["ts"][valid], utc=True).dt.as_unit("us").reset_index(drop=True),
        }
    )
    for column in counts:
        behavior = column[len(STAT_PREFIX) :]
        if behavior == "events":
            mine = log
        elif behavior in set(log["behavior"]):
            mine = log[log["behavior"] == behavior]
        else:
            continue
        mine = mine.sort_values(["item_id", "ts"], kind="stable")
        mine = mine.assign(_before=mine.groupby("item_id").cumcount() + 1).sort_values("ts", kind="stable")
        found = pd.merge_asof(
            queries, mine[["item_id", "ts", "_before"]], on="ts", by="item_id", allow_exact_matches=False
        )  # the item's last event strictly before the snapshot, and how many came up to it
        allowed = found["_before"].fillna(0).to_numpy()
        values = pd.to_numeric(stats[column], errors="coerce").to_numpy()[found["_row"].to_numpy()]
        ok[found["_row"].to_numpy()] &= ~(values > allowed)  # NaN compares False: the not-null check's
    return ok


def _known(ids: pd.Series, catalogue: pd.Series) -> np.ndarray:
    """True where an id is in ``catalogue`` or null (nulls are the not-null expectation's to report)."""
    if isinstance(ids.dtype, pd.CategoricalDtype):  # look each distinct id up once, then spread by code
        found = _is_in(pd.Series(ids.cat.categories), catalogue)
        return np.append(found, True)[ids.cat.codes.to_numpy()]  # code -1 (null) picks the True
    return _is_in(ids, catalogue) | ids.isna().to_numpy()


def _is_in(values: pd.Series, catalogue: pd.Series) -> np.ndarray:
    # arrow's hash-set lookup: pandas isin converts both sides to Python objects first
    found = pc.is_in(_arrow_strings(values), value_set=_arrow_strings(catalogue))
    return found.to_numpy(zero_copy_only=False)


def _arrow_strings(series: pd.Series) -> pa.Array:
    array = pa.array(series, from_pandas=True)
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array.cast(pa.large_string())  # string and large_string may meet: is_in needs one type


def _stat_columns(items: pd.DataFrame) -> list[str]:
    # bool counts as numeric to pandas, but a flag has no sign to check
    return [c for c in schema.item_stat_columns(items) if not pd.api.types.is_bool_dtype(items[c])]


def _run_gx(suites: list[_Suite], max_examples: int) -> list[Failure]:
    """Run one GX suite per table on an ephemeral context and turn failed results into Failures."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # tqdm bars per metric graph would flood pipeline logs
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("marn")
    # SUMMARY (not COMPLETE) caps the per-expectation lists at partial_unexpected_count: COMPLETE would
    # materialise every bad value, millions when a whole column is off
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": max_examples}

    failures = []
    for s in suites:
        batch = source.add_dataframe_asset(s.table).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=s.table))
        for i, check in enumerate(s.checks):
            check.expectation.meta = {"marn_check": i}  # maps results back to checks, whatever the order
            suite.add_expectation(check.expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate_{s.table}", data=batch, suite=suite)
        )
        # one run per table: GX fingerprints (hashes) the whole frame for every batch it builds
        result = definition.run(batch_parameters={"dataframe": s.df}, result_format=result_format)
        failed = sorted(  # GX returns results in its own order; report them in the suite's
            (r.expectation_config.meta["marn_check"], r) for r in result.results if not r.success
        )
        for i, r in failed:
            error = _exception(r.exception_info)
            failures.append(_failure(s, s.checks[i], r.result or {}, error, max_examples))
        s.df.drop(columns=[_KNOWN_ITEM], errors="ignore", inplace=True)
    return failures


def _import_gx() -> Any:
    """Import GX lazily (it takes seconds) with its logging kept to warnings unless the caller chose a level:
    registering its datasources at import logs hundreds of lines, and every context logs at INFO."""
    root = logging.getLogger("great_expectations")
    if root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations  # makes gx.expectations available

    # this module logger is pinned to INFO by GX itself at import, so the parent's level does not reach it
    base = logging.getLogger("great_expectations.data_context.types.base")
    if base.level == logging.INFO:
        base.setLevel(logging.NOTSET)
    return gx


def _exception(info: Any) -> str:
    """The message of an exception GX caught while evaluating an expectation, or ''."""
    if not isinstance(info, dict):
        return ""
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "error")
    for value in info.values():  # some versions key the info by metric id
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "error")
    return ""


def _failure(s: _Suite, check: _Check, result: dict, error: str, max_examples: int) -> Failure:
    unexpected = int(result.get("unexpected_count") or 0)
    index = list(result.get("partial_unexpected_index_list") or [])[:max_examples]
    # the row's key columns, so it can be found again, then the failing column(s)
    shown = list(dict.fromkeys([*_KEY_COLUMNS[s.table], *(check.column or "").split(",")]))
    shown = [c for c in shown if c in s.df.columns]
    examples = [_row(s.df, i, shown) for i in index]
    message = f"GX error: {error}" if error else check.message
    return Failure(s.table, check.column, check.name, unexpected, len(s.df), examples, message)


def _row(df: pd.DataFrame, index: Any, columns: list[str]) -> dict[str, Any]:
    row = df.loc[index, columns]
    return {"row": _json_value(index), **{c: _json_value(row[c]) for c in columns}}


def _json_value(value: Any) -> Any:
    """Bad values come from bad data: make each one JSON-safe (timestamps as ISO text, NaN/NaT as null)."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)  # strict JSON has no NaN or Infinity
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)):
        return value
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _utc(value: datetime) -> pd.Timestamp:
    """Naive datetimes (e.g. from a YAML config without offset) are taken as UTC."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
