"""Import the GroupLens MovieLens 100K data set (official ``ml-100k`` layout) into the canonical tables.

Source files (``src``):

- ``u.data``  tab-separated user id, item id, rating, unix seconds.
- ``u.item``  pipe-separated, latin-1: id, title, release date, video release date, IMDb URL, one 0/1 flag
  per genre of ``u.genre``.
- ``u.user``  pipe-separated: id, age, gender, occupation, zip code.
- ``u.genre`` pipe-separated genre name and index, defining the order of the flags.

Optional media (``media``): ``posters/<id>.jpg`` and ``tmdb_items.csv`` (one row per movie id, with
duplicates and gaps) providing a plot overview and the runtime.

Mapping:

- events: behavior ``"rating"``, ts from unix seconds (UTC), the star rating kept as the numeric column
  ``rating``. There is no label column: labels come from the DIN protocol with sampled negatives.
- items: category_id = the item's genres joined with ``"|"`` in u.genre order (``"unknown"`` when none),
  title = title + overview, image_uri = the absolute poster path when the file exists, first_seen = the
  item's first rating (what the platform knew, not the release date), numeric statistics
  ``release_year`` and ``runtime``. brand_id and shop_id stay null: a movie has no seller, and inventing
  one (e.g. release decade as "brand") would only duplicate ``release_year`` under a misleading name.
- users: user_id, age, gender, occupation, zip.
- item_stats: daily point-in-time rating counts (:func:`marn.data.stats.daily_item_stats`).

TMDB's ``vote_average`` and ``vote_count`` are deliberately NOT imported: they were measured decades after
the 1997-98 ratings, so as features they would leak the future (and partly the ratings themselves).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from marn.data.importing import (
    ImportSummary,
    finish_import,
    first_seen,
    local_image_uri,
    read_delimited,
    require_dir,
    require_file,
    unix_to_utc,
)

__all__ = ["ImportSummary", "import_movielens"]

SOURCE_FILES = ("u.data", "u.item", "u.user", "u.genre")
TMDB_FILE = "tmdb_items.csv"
POSTERS_DIR = "posters"
UNKNOWN_CATEGORY = "unknown"
_ITEM_FIXED_FIELDS = 5  # id, title, release date, video release date, IMDb URL


def import_movielens(src: Path, out: Path, media: Path | None = None) -> ImportSummary:
    """Import ml-100k from ``src`` (and optional ``media``) into the canonical dataset directory ``out``.

    Raises FileNotFoundError naming a missing source file or media directory, and ValueError naming the
    file and line of a malformed line (wrong field count, non-integer id).
    """
    src, out = Path(src), Path(out)
    paths = {name: require_file(src / name, "MovieLens file") for name in SOURCE_FILES}
    if media is not None:
        media = require_dir(Path(media), "MovieLens media directory")

    genres = _read_genres(paths["u.genre"])
    events = _read_ratings(paths["u.data"])
    items = _read_items(paths["u.item"], genres)
    users = _read_users(paths["u.user"])

    tmdb = _read_tmdb(media / TMDB_FILE) if media is not None and (media / TMDB_FILE).is_file() else None
    items = _add_media(items, tmdb, media, out)
    items["first_seen"] = items["item_id"].map(first_seen(events))
    columns = ["item_id", "category_id", "brand_id", "shop_id", "title", "image_uri", "first_seen"]
    items = items[[*columns, "release_year", "runtime"]]
    return finish_import(out, events, items, users)


def _read_genres(path: Path) -> list[str]:
    """Genre names ordered by their flag index."""
    rows = [(int(f[1]), f[0]) for _, f in read_delimited(path, "|", 2, int_fields=(1,), encoding="latin-1")]
    indices = sorted(i for i, _ in rows)
    if indices != list(range(len(rows))):
        raise ValueError(f"{path}: genre indices must be 0..{len(rows) - 1}, got {indices}")
    return [name for _, name in sorted(rows)]


def _read_ratings(path: Path) -> pd.DataFrame:
    rows = [f for _, f in read_delimited(path, "\t", 4, int_fields=(0, 1, 2, 3))]
    raw = pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])
    events = pd.DataFrame(
        {
            "user_id": raw["user"].astype(int).astype(str),  # int round trip normalises e.g. "007"
            "item_id": raw["item"].astype(int).astype(str),
            "behavior": "rating",
            "ts": unix_to_utc(raw["ts"].astype(np.int64)),
            "rating": raw["rating"].astype(np.int64),
        }
    )
    # Time order (stable, so same-second ratings keep file order) makes the table easy to scan and split.
    return events.sort_values("ts", kind="stable").reset_index(drop=True)


def _read_items(path: Path, genres: list[str]) -> pd.DataFrame:
    n_fields = _ITEM_FIXED_FIELDS + len(genres)
    flag_fields = tuple(range(_ITEM_FIXED_FIELDS, n_fields))
    records = []
    for lineno, f in read_delimited(path, "|", n_fields, int_fields=(0, *flag_fields), encoding="latin-1"):
        flags = [int(f[i]) for i in flag_fields]
        if any(flag not in (0, 1) for flag in flags):
            raise ValueError(f"{path}:{lineno}: genre flags must be 0 or 1, got {flags}")
        names = [g for g, flag in zip(genres, flags, strict=True) if flag]
        records.append(
            {
                "item_id": str(int(f[0])),
                "category_id": "|".join(names) if names else UNKNOWN_CATEGORY,
                "title": f[1].strip(),
                "release": f[2].strip(),
            }
        )
    items = pd.DataFrame.from_records(records, columns=["item_id", "category_id", "title", "release"])
    # Release dates look like "01-Jan-1995"; some are empty (e.g. the "unknown" movie).
    release = pd.to_datetime(items.pop("release"), format="%d-%b-%Y", errors="coerce")
    items["release_year"] = release.dt.year.astype(float)
    items["brand_id"] = None
    items["shop_id"] = None
    return items


def _read_users(path: Path) -> pd.DataFrame:
    rows = [f for _, f in read_delimited(path, "|", 5, int_fields=(0, 1), encoding="latin-1")]
    raw = pd.DataFrame(rows, columns=["user_id", "age", "gender", "occupation", "zip"])
    raw["user_id"] = raw["user_id"].astype(int).astype(str)
    raw["age"] = raw["age"].astype(np.int64)
    return raw


def _read_tmdb(path: Path) -> pd.DataFrame:
    """One row per movie id with ``overview`` (str, possibly empty), ``runtime`` and ``tmdb_year``.

    Duplicate ids are resolved deterministically: the first row with a non-empty overview, else the first
    row. Rows without an id cannot be linked and are dropped; a non-integer id is an error.
    """
    table = pd.read_csv(path, dtype={"movie_id": "string", "overview": "string"}, keep_default_na=True)
    missing = [c for c in ("movie_id", "overview", "runtime") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; have {list(table.columns)}")
    ids = table["movie_id"].str.strip()
    table = table[ids.notna() & (ids != "")].copy()
    numeric = pd.to_numeric(table["movie_id"], errors="coerce")
    bad = table["movie_id"][numeric.isna() | (numeric % 1 != 0)]
    if len(bad):
        raise ValueError(f"{path}: movie_id must be an integer, got {bad.iloc[0]!r}")
    table["item_id"] = numeric.astype(np.int64).astype(str)
    table["overview"] = table["overview"].fillna("").str.strip()
    has_overview = (table["overview"] != "").to_numpy()
    # lexsort: last key is primary -> by id, rows with an overview first, then file order.
    order = np.lexsort((np.arange(len(table)), ~has_overview, numeric.to_numpy()))
    table = table.iloc[order].drop_duplicates("item_id", keep="first")
    runtime = pd.to_numeric(table["runtime"], errors="coerce")
    table["runtime"] = runtime.where(runtime > 0)  # TMDB writes 0 for an unknown runtime
    year = pd.to_numeric(table["year"], errors="coerce") if "year" in table.columns else np.nan
    table["tmdb_year"] = year
    return table[["item_id", "overview", "runtime", "tmdb_year"]].set_index("item_id")


def _add_media(items: pd.DataFrame, tmdb: pd.DataFrame | None, media: Path | None, out: Path) -> pd.DataFrame:
    items = items.copy()
    if tmdb is not None:
        joined = items[["item_id"]].join(tmdb, on="item_id")
        overview = joined["overview"].fillna("")
        items["title"] = (items["title"] + " " + overview).where(overview != "", items["title"])
        items["runtime"] = joined["runtime"].astype(float)
        # u.item's release date is the primary source; TMDB's year only fills its gaps.
        items["release_year"] = items["release_year"].fillna(joined["tmdb_year"].astype(float))
    else:
        items["runtime"] = np.nan
    if media is not None:
        posters = media / POSTERS_DIR
        items["image_uri"] = [local_image_uri(posters / f"{i}.jpg", out) for i in items["item_id"]]
    else:
        items["image_uri"] = None
    return items
