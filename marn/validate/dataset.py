"""Validate a dataset directory: structure first (:mod:`marn.validate.checks`), then the values of what
could be read (:mod:`marn.validate.suites`), into one :class:`~marn.validate.report.ValidationReport`."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from marn.config import ValidateConfig
from marn.data import schema
from marn.validate.checks import derivable, load_table
from marn.validate.report import DataValidationError, Failure, ValidationReport
from marn.validate.suites import build_suites, run_gx


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
        loaded = load_table(data_dir, table, failures, derivable(table, usable))
        if loaded is not None:
            frames[table], usable[table] = loaded

    suites = build_suites(frames, usable, cfg, _utc(cfg.earliest_ts), latest)
    if suites:
        failures += run_gx(suites, cfg.max_bad_examples)

    return ValidationReport(
        success=not failures,
        failures=failures,
        row_counts={t: len(df) for t, df in frames.items()},
        elapsed_s=time.perf_counter() - start,
        data_dir=str(data_dir),
        now=now_ts.isoformat(),
    )


def _utc(value: datetime) -> pd.Timestamp:
    """Naive datetimes (e.g. from a YAML config without offset) are taken as UTC."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
