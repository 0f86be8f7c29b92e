"""Value checks: one Great Expectations suite per table, run once on the whole table through an ephemeral
context: nulls, ranges, allowed sets, uniqueness, events pointing at unknown items, statistics that count
events from their own future."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from marn.config import ValidateConfig
from marn.data import schema
from marn.data.stats import STAT_PREFIX
from marn.validate.report import Failure, json_value

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


def build_suites(
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


def run_gx(suites: list[_Suite], max_examples: int) -> list[Failure]:
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
    return {"row": json_value(index), **{c: json_value(row[c]) for c in columns}}
