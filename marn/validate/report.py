"""The validation report: failures naming table, column and expectation with a few bad rows, as text,
JSON-ready values and a self-contained HTML page."""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd


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
        return asdict(self)  # examples already hold only JSON types (see json_value)

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


def json_value(value: Any) -> Any:
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
