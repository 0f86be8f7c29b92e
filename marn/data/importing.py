"""Shared pieces of the source importers (MovieLens, Amazon): the import summary, input checks, file
readers with line-numbered errors, and ``finish_import``, which writes every canonical table.

Each importer maps its source onto the canonical tables of :mod:`marn.data.schema` and then calls
``finish_import``; item statistics are always derived here from the imported events, so every source gets
the same point-in-time guarantee.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from marn.data.files import open_binary
from marn.data.schema import EVENTS, ITEM_STATS, ITEMS, USERS, with_first_seen, write_table
from marn.data.schema import first_seen as first_seen  # re-exported: it moved to schema for read_dataset
from marn.data.stats import daily_item_stats


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote: row counts and the dataset directory."""

    events: int
    users: int
    items: int
    items_with_image: int
    out: Path


def require_file(path: Path, what: str = "input file") -> Path:
    """``path`` if it is a file, else FileNotFoundError naming it (before any partial output is written)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_dir(path: Path, what: str = "input directory") -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    """Open a text file, transparently gunzipping it (detected by content, not by the file name)."""
    return io.TextIOWrapper(open_binary(path), encoding=encoding, newline="")


def read_delimited(
    path: Path,
    sep: str,
    n_fields: int,
    int_fields: tuple[int, ...] = (),
    encoding: str = "utf-8",
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) of a delimited file without header; blank lines are skipped.

    Every line must have exactly ``n_fields`` fields and integers in ``int_fields``; otherwise ValueError
    naming the file and the 1-based line number.
    """
    with open_text(path, encoding=encoding) as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(sep)
            if len(fields) != n_fields:
                raise ValueError(f"{path}:{lineno}: expected {n_fields} fields, got {len(fields)}: {line!r}")
            for i in int_fields:
                if not _is_int(fields[i]):
                    raise ValueError(f"{path}:{lineno}: field {i + 1} must be an integer, got {fields[i]!r}")
            yield lineno, fields


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def unix_to_utc(seconds: pd.Series) -> pd.Series:
    """Unix seconds -> tz-aware UTC timestamps (microsecond unit, as the contract stores them)."""
    return pd.to_datetime(seconds.astype("int64"), unit="s", utc=True).dt.as_unit("us")


def local_image_uri(path: Path | None, out: Path) -> str | None:
    """The canonical image_uri of an existing local file, else None.

    Relative to ``out`` when the file lies inside the dataset directory (the dataset then moves as a
    whole), absolute otherwise: importers point at media they must not copy.
    """
    if path is None or not path.is_file():
        return None
    path = path.resolve()
    try:
        return path.relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path)


def finish_import(
    out: Path, events: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame | None = None
) -> ImportSummary:
    """Check referential integrity, then write events, items, users (if any) and item_stats into ``out``.

    Items without ``first_seen`` get it derived from ``events`` (:func:`marn.data.schema.with_first_seen`).

    item_stats is :func:`marn.data.stats.daily_item_stats` of ``events``: each snapshot counts strictly
    earlier events only. Raises ValueError when an event references an unknown item (or user, when a
    users table is given) or when ids repeat in items/users.
    """
    out = Path(out)
    _check_unique(items, "item_id", "items")
    unknown = pd.Index(events["item_id"].unique()).difference(pd.Index(items["item_id"]))
    if len(unknown):
        raise ValueError(f"{len(unknown)} event item(s) missing from items, e.g. {list(unknown[:5])}")
    if users is not None:
        _check_unique(users, "user_id", "users")
        unknown = pd.Index(events["user_id"].unique()).difference(pd.Index(users["user_id"]))
        if len(unknown):
            raise ValueError(f"{len(unknown)} event user(s) missing from users, e.g. {list(unknown[:5])}")
    write_table(out, EVENTS, events)
    write_table(out, ITEMS, with_first_seen(items, events))
    if users is not None:
        write_table(out, USERS, users)
    write_table(out, ITEM_STATS, daily_item_stats(events))
    n_users = len(users) if users is not None else int(events["user_id"].nunique())
    return ImportSummary(
        events=len(events),
        users=n_users,
        items=len(items),
        items_with_image=int(items["image_uri"].notna().sum()),
        out=out,
    )


def _check_unique(df: pd.DataFrame, key: str, table: str) -> None:
    repeated = df[key][df[key].duplicated()].unique()
    if len(repeated):
        raise ValueError(f"{table}: {len(repeated)} repeated {key}(s), e.g. {list(repeated[:5])}")
