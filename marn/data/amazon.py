"""Import the public Amazon review data (McAuley et al., UCSD) into the canonical tables.

Accepted inputs, plain or gzipped (detected by content), one record per line:

- reviews: strict JSON lines with ``reviewerID``, ``asin``, ``unixReviewTime`` and optionally ``overall``
  (2014 ``reviews_<Cat>_5.json`` and 2018 ``<Cat>_5.json`` share these names).
- metadata, 2014 style: Python dict literals (single quotes, not JSON) with ``asin``, ``title``,
  ``categories`` (a list of category paths), ``brand``, ``price`` (number), ``imUrl``. They are parsed
  with :func:`ast.literal_eval`, which evaluates literals only, never code.
- metadata, 2018 style: JSON with ``category`` (one path), ``brand``, ``price`` (text such as "$12.99"),
  ``imageURLHighRes`` / ``image`` (lists of URLs).

Mapping:

- events: user_id = reviewerID, item_id = asin, behavior ``"review"``, ts = unixReviewTime (UTC), the star
  rating kept as the numeric column ``rating``. Exact repeats of (user, item, time), which the 2018 dumps
  contain, are dropped.
- items: one row per reviewed item (metadata of never-reviewed products is skipped, as in DIN); items
  reviewed but absent from the metadata still get a row with category ``"unknown"``. category_id is the
  last, most specific entry of the LAST category path, exactly DIN's ``categories[-1][-1]`` (for the
  2018 single-path ``category`` list: its last entry); brand_id = brand or null; shop_id null; price a
  numeric statistic; first_seen = the item's first review. image_uri is a local file
  ``<images>/<asin>.jpg`` when it exists, else null; the remote URL is kept in the string column
  ``image_url`` for a later download step.
- item_stats: daily point-in-time review counts (:func:`marn.data.stats.daily_item_stats`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marn.data.importing import (
    ImportSummary,
    finish_import,
    first_seen,
    local_image_uri,
    open_text,
    require_dir,
    require_file,
    unix_to_utc,
)

__all__ = ["ImportSummary", "import_amazon"]

UNKNOWN_CATEGORY = "unknown"
_PRICE = re.compile(r"^\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)$")


def import_amazon(reviews: Path, meta: Path, out: Path, images: Path | None = None) -> ImportSummary:
    """Import an Amazon reviews file and its metadata file into the canonical dataset directory ``out``.

    ``images``, if given, is a directory of already downloaded ``<asin>.jpg`` files. Raises
    FileNotFoundError naming a missing input, and ValueError naming the file and line of a record that
    cannot be parsed or lacks a required field.
    """
    reviews, meta, out = Path(reviews), Path(meta), Path(out)
    require_file(reviews, "Amazon reviews file")
    require_file(meta, "Amazon metadata file")
    if images is not None:
        images = require_dir(Path(images), "Amazon images directory")

    events = _read_reviews(reviews)
    wanted = set(events["item_id"].unique())
    meta_by_asin = _read_meta(meta, wanted)
    items = _build_items(events, meta_by_asin, images, out)
    return finish_import(out, events, items)


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) of a JSON-lines or Python-literal-lines file; blank lines are skipped."""
    with open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = _parse_line(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                why = f"neither JSON nor a Python dict literal ({type(err).__name__}: {err})"
                raise ValueError(f"{path}:{lineno}: {why}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected an object, got {type(record).__name__}")
            yield lineno, record


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        # 2014 metadata: repr() of Python dicts. literal_eval accepts literals only, never code.
        return ast.literal_eval(line.strip())


def _require(record: dict[str, Any], key: str, path: Path, lineno: int) -> Any:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{path}:{lineno}: missing required field {key!r}")
    return value


def _read_reviews(path: Path) -> pd.DataFrame:
    users, items, times, ratings = [], [], [], []
    for lineno, record in iter_records(path):
        users.append(str(_require(record, "reviewerID", path, lineno)))
        items.append(str(_require(record, "asin", path, lineno)))
        ts = _require(record, "unixReviewTime", path, lineno)
        try:
            times.append(int(ts))
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{lineno}: unixReviewTime must be an integer, got {ts!r}") from None
        ratings.append(_to_float(record.get("overall")))
    events = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=object),
            "item_id": pd.Series(items, dtype=object),
            "behavior": "review",
            "ts": unix_to_utc(pd.Series(times, dtype=np.int64)),
            "rating": pd.Series(ratings, dtype=np.float64),
        }
    )
    events = events.drop_duplicates(["user_id", "item_id", "ts"], keep="first")
    return events.sort_values("ts", kind="stable").reset_index(drop=True)


def _read_meta(path: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Parsed metadata of the ``wanted`` asins; the first record wins when an asin repeats."""
    found: dict[str, dict[str, Any]] = {}
    for lineno, record in iter_records(path):
        asin = str(_require(record, "asin", path, lineno))
        if asin in wanted and asin not in found:
            found[asin] = {
                "category_id": _category(record),
                "brand_id": _clean_text(record.get("brand")),
                "title": _clean_text(record.get("title")),
                "price": _price(record.get("price")),
                "image_url": _image_url(record),
            }
    return found


def _build_items(
    events: pd.DataFrame, meta_by_asin: dict[str, dict[str, Any]], images: Path | None, out: Path
) -> pd.DataFrame:
    seen = first_seen(events)
    missing = dict(category_id=UNKNOWN_CATEGORY, brand_id=None, title=None, price=np.nan, image_url=None)
    rows = []
    for asin in sorted(seen.index):
        row = {"item_id": asin, **meta_by_asin.get(asin, missing)}
        row["image_uri"] = local_image_uri(images / f"{asin}.jpg", out) if images is not None else None
        rows.append(row)
    items = pd.DataFrame.from_records(
        rows, columns=["item_id", "category_id", "brand_id", "title", "image_uri", "price", "image_url"]
    )
    items["shop_id"] = None
    items["first_seen"] = items["item_id"].map(seen)
    items["price"] = items["price"].astype(np.float64)
    columns = ["item_id", "category_id", "brand_id", "shop_id", "title", "image_uri", "first_seen"]
    return items[[*columns, "price", "image_url"]]


def _category(record: dict[str, Any]) -> str:
    paths = record.get("categories")
    if paths is None:
        paths = [record.get("category")]  # 2018: a single path
    if isinstance(paths, str):
        paths = [[paths]]
    if not isinstance(paths, list) or not paths:
        return UNKNOWN_CATEGORY
    path = paths[-1]  # DIN: categories[-1][-1]
    if isinstance(path, str):
        path = [path]
    if not isinstance(path, list):
        return UNKNOWN_CATEGORY
    names = [name for name in (_clean_text(p) for p in path) if name]
    return names[-1] if names else UNKNOWN_CATEGORY


def _image_url(record: dict[str, Any]) -> str | None:
    for key in ("imUrl", "imageURLHighRes", "imageURL", "image"):
        value = record.get(key)
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, str) and v.strip()), None)
        url = _clean_text(value)
        if url:
            return url
    return None


def _clean_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def _price(value: Any) -> float:
    """2014 prices are numbers; 2018 ones are text like "$1,299.00" (ranges and junk -> NaN)."""
    if isinstance(value, bool):
        return np.nan
    if isinstance(value, int | float):
        return float(value) if np.isfinite(value) and value >= 0 else np.nan
    if isinstance(value, str):
        match = _PRICE.match(value.strip())
        if match:
            return float(match.group(1).replace(",", ""))
    return np.nan


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan
