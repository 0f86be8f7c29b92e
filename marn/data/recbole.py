"""Import a dataset in RecBole's atomic-file format into the canonical tables.

Source files (``src``, dataset ``name``), as RecBole 1.2 reads them (``recbole/data/dataset/dataset.py``
``_load_feat``; field separator a tab, sequence separator a space, UTF-8):

- ``NAME.inter``  required: one interaction a line; fields ``user_id:token`` and ``item_id:token``,
  optionally ``timestamp:float`` (unix seconds, fractions allowed), ``rating:float``, ``label:float`` (0/1)
  and any other fields.
- ``NAME.item``   required: one item a line, keyed by ``item_id:token``.
- ``NAME.user``   optional: one user a line, keyed by ``user_id:token``.

The first line of each file is its header, ``field:type`` pairs separated by tabs, the type one of
``token``, ``float``, ``token_seq``, ``float_seq``. Fields are split on tabs only (no quoting: RecBole's
shipped files quote nothing). Blank lines are skipped; an empty float is missing (NaN), as in RecBole.

Mapping:

- events: user_id and item_id as the tokens are (no renumbering), behavior ``"rating"`` when the file has
  a ``rating`` field and ``"click"`` otherwise, every other float field kept as a numeric column (e.g.
  ``rating``), a ``label`` field as the contract's 0/1 ``label`` column.
- ts: from ``timestamp`` when the file has it (unix seconds, UTC, rounded to microseconds; events are then
  sorted by it, stably, so equal times keep file order). Without it, the file order is the time: the
  interaction on the i-th data line (0-based) gets ``ORDER_ORIGIN + i * order_step`` (2000-01-01 UTC plus
  one minute per line by default). Every event then has its own instant, each user's history keeps file
  order, and the daily point-in-time statistics advance by one day per 1,440 lines; order times are
  made up, so they only mean "earlier in the file".
- items: every ``.item`` row. category_id from the first field present among ``CATEGORY_FIELDS``
  (a ``token_seq`` joined with ``"|"``, as the MovieLens importer joins genres; ``"unknown"`` when empty
  or absent); title from the first of ``TITLE_FIELDS`` (the text as written); brand_id and shop_id from
  ``brand``/``brand_id`` and ``shop``/``shop_id`` when present; image_uri null (atomic files have no
  media); first_seen the item's first event. Other float fields become static numeric statistics (only
  import ones measured no later than the interactions: a later measurement is a future leak, like the TMDB
  vote counts the MovieLens importer leaves out); other token fields stay as string columns; float_seq
  fields are not imported (the contract has no vector column for items). Items that interactions name
  but ``.item`` lacks get a row with category ``"unknown"`` (RecBole tolerates them too).
- users: with ``.user``, its rows (profile tokens as strings, floats as numbers); users that interactions
  name but ``.user`` lacks get a row with an empty profile.
- item_stats: daily point-in-time counts of the events (:func:`marn.data.stats.daily_item_stats`).

Bad input raises ValueError naming the file and the 1-based line: a malformed header, an unknown type, a
missing required field, a wrong field count, an empty id, an unparseable or non-finite number, a repeated
key, a line that is not UTF-8. A UTF-8 byte-order mark before the header is ignored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import pandas as pd

from marn.data.files import open_binary
from marn.data.importing import ImportSummary, finish_import, require_dir, require_file

__all__ = ["AtomicFile", "FieldType", "ImportSummary", "import_recbole", "read_atomic_file"]

log = logging.getLogger(__name__)

FIELD_SEPARATOR = "\t"
SEQ_SEPARATOR = " "
USER_ID, ITEM_ID, TIMESTAMP, RATING, LABEL = "user_id", "item_id", "timestamp", "rating", "label"
CATEGORY_FIELDS = ("category_id", "category", "categories", "class", "genre", "genres", "cate_id")
TITLE_FIELDS = ("title", "movie_title", "name", "item_name")
BRAND_FIELDS = ("brand_id", "brand")
SHOP_FIELDS = ("shop_id", "shop", "seller_id")
UNKNOWN_CATEGORY = "unknown"
ORDER_ORIGIN = pd.Timestamp("2000-01-01", tz="UTC")
DEFAULT_ORDER_STEP = pd.Timedelta(minutes=1)
# pandas' nanosecond timestamps end in 2262; a timestamp beyond is an input error, not an overflow
_MAX_ABS_UNIX_S = 9.2e9


class FieldType(StrEnum):
    """RecBole's field types (``recbole.utils.enum_type.FeatureType``)."""

    TOKEN = "token"
    FLOAT = "float"
    TOKEN_SEQ = "token_seq"
    FLOAT_SEQ = "float_seq"


@dataclass(frozen=True)
class AtomicFile:
    """One parsed atomic file: its header's types and one column per field (floats parsed, text kept)."""

    path: Path
    types: dict[str, FieldType]
    columns: dict[str, list]
    lines: list[int]  # the 1-based source line of each row

    def __len__(self) -> int:
        return len(self.lines)


def read_atomic_file(path: Path, required: tuple[str, ...] = (), key: str | None = None) -> AtomicFile:
    """Parse one RecBole atomic file; ValueError naming ``path`` and the line on any bad input.

    ``required`` fields must be in the header as ``token`` fields and non-empty on every line; ``key``,
    when given, must not repeat.
    """
    path = Path(path)
    with open_binary(path) as handle:
        lines_read = enumerate(handle, start=1)
        first = next(lines_read, None)
        if first is None:
            raise ValueError(f"{path}:1: empty file, expected a header of field:type pairs")
        header = _decode(first[1], path, 1).removeprefix("\ufeff")  # a BOM some editors write
        types = _parse_header(header, path, 1, required)
        columns: dict[str, list] = {name: [] for name in types}
        lines: list[int] = []
        seen: dict[str, int] = {}
        for lineno, raw in lines_read:
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            values = line.split(FIELD_SEPARATOR)
            if len(values) != len(types):
                raise ValueError(
                    f"{path}:{lineno}: expected {len(types)} tab-separated fields "
                    f"({', '.join(types)}), got {len(values)}: {line[:200]!r}"
                )
            for (name, field_type), text in zip(types.items(), values, strict=True):
                columns[name].append(_parse_value(text, field_type, name, path, lineno))
            for name in required:
                if not columns[name][-1].strip():
                    raise ValueError(f"{path}:{lineno}: field {name!r} is empty")
            if key is not None:
                value = columns[key][-1]
                if value in seen:
                    raise ValueError(f"{path}:{lineno}: {key} {value!r} repeats line {seen[value]}")
                seen[value] = lineno
            lines.append(lineno)
    return AtomicFile(path=path, types=types, columns=columns, lines=lines)


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start})") from None


def _parse_header(line: str, path: Path, lineno: int, required: tuple[str, ...]) -> dict[str, FieldType]:
    types: dict[str, FieldType] = {}
    for entry in line.split(FIELD_SEPARATOR):
        parts = entry.split(":")
        if len(parts) != 2 or not parts[0]:
            raise ValueError(f"{path}:{lineno}: header entry {entry!r} is not field:type")
        name, type_name = parts
        try:
            field_type = FieldType(type_name)
        except ValueError:
            allowed = ", ".join(t.value for t in FieldType)
            raise ValueError(
                f"{path}:{lineno}: field {name!r} has unknown type {type_name!r}; RecBole types: {allowed}"
            ) from None
        if name in types:
            raise ValueError(f"{path}:{lineno}: field {name!r} appears twice in the header")
        types[name] = field_type
    missing = [name for name in required if name not in types]
    if missing:
        raise ValueError(f"{path}:{lineno}: missing required field(s) {missing}; header has {list(types)}")
    for name in required:
        if types[name] is not FieldType.TOKEN:
            raise ValueError(f"{path}:{lineno}: field {name!r} must be token, got {types[name].value}")
    return types


def _parse_value(text: str, field_type: FieldType, name: str, path: Path, lineno: int):
    if field_type is FieldType.TOKEN:
        return text
    if field_type is FieldType.TOKEN_SEQ:
        return text.strip()
    if field_type is FieldType.FLOAT:
        return _parse_float(text, name, path, lineno)
    return [_parse_float(part, name, path, lineno) for part in text.split(SEQ_SEPARATOR) if part]


def _parse_float(text: str, name: str, path: Path, lineno: int) -> float:
    if not text.strip():
        return math.nan  # an empty float is missing, as pandas reads it in RecBole
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: field {name!r}: {text[:50]!r} is not a number") from None
    if not math.isfinite(value):  # "nan"/"inf" spelled out is a corrupt value, not a missing one
        raise ValueError(f"{path}:{lineno}: field {name!r}: {text[:50]!r} is not a finite number")
    return value


def import_recbole(
    src: Path, name: str, out: Path, order_step: pd.Timedelta = DEFAULT_ORDER_STEP
) -> ImportSummary:
    """Import RecBole atomic files ``src/name.{inter,item[,user]}`` into the dataset directory ``out``.

    ``order_step`` spaces the made-up times of a file without ``timestamp`` (see the module docstring).
    Raises FileNotFoundError naming a missing file and ValueError naming the file and line of bad input.
    """
    src, out = Path(src), Path(out)
    require_dir(src, "RecBole dataset directory")
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"dataset name {name!r} must be a plain file-name stem such as 'ml-100k'")
    if order_step <= pd.Timedelta(0):
        raise ValueError(f"order_step must be positive, got {order_step}")
    inter = read_atomic_file(require_file(src / f"{name}.inter", "RecBole file"), required=(USER_ID, ITEM_ID))
    item = read_atomic_file(require_file(src / f"{name}.item", "RecBole file"), (ITEM_ID,), key=ITEM_ID)
    user_path = src / f"{name}.user"
    user = read_atomic_file(user_path, (USER_ID,), key=USER_ID) if user_path.is_file() else None
    if not len(inter):
        raise ValueError(f"{inter.path}: no interactions after the header")

    events = _events(inter, order_step)
    items = _complete(
        _items(item), events["item_id"], "item_id", {"category_id": UNKNOWN_CATEGORY}, item.path
    )
    users = _complete(_profile(user), events["user_id"], "user_id", {}, user.path) if user else None
    return finish_import(out, events, items, users)


def _events(inter: AtomicFile, order_step: pd.Timedelta) -> pd.DataFrame:
    columns = inter.columns
    events = pd.DataFrame(
        {
            "user_id": columns[USER_ID],
            "item_id": columns[ITEM_ID],
            "behavior": "rating" if RATING in inter.types else "click",
        }
    )
    if TIMESTAMP in inter.types:
        events["ts"] = _unix_to_utc(inter, TIMESTAMP)
    else:
        events["ts"] = ORDER_ORIGIN + order_step * np.arange(len(inter), dtype=np.int64)
    if LABEL in inter.types:
        events["label"] = _labels(inter)
    for field in _fields(inter, FieldType.FLOAT, exclude=(TIMESTAMP, LABEL)):
        events[field] = np.asarray(columns[field], dtype=np.float64)
    # stable: equal times keep file order, which is then each user's order of behaviours
    return events.sort_values("ts", kind="stable").reset_index(drop=True)


def _unix_to_utc(inter: AtomicFile, field: str) -> pd.Series:
    if inter.types[field] is not FieldType.FLOAT:
        raise ValueError(f"{inter.path}:1: field {field!r} must be float, got {inter.types[field].value}")
    seconds = np.asarray(inter.columns[field], dtype=np.float64)
    bad = np.flatnonzero(~(np.abs(seconds) < _MAX_ABS_UNIX_S))  # NaN (empty) fails too
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"{inter.path}:{inter.lines[row]}: field {field!r} must be unix seconds, got {seconds[row]!r}"
        )
    micros = np.round(seconds * 1e6).astype(np.int64)
    return pd.Series(pd.to_datetime(micros, unit="us", utc=True))


def _labels(inter: AtomicFile) -> np.ndarray:
    values = np.asarray(inter.columns[LABEL], dtype=np.float64)
    bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
    if len(bad):
        row = int(bad[0])
        raise ValueError(
            f"{inter.path}:{inter.lines[row]}: field {LABEL!r} must be 0 or 1, got {values[row]}"
        )
    return values.astype(np.int8)


def _fields(atomic: AtomicFile, field_type: FieldType, exclude: tuple[str, ...]) -> list[str]:
    return [f for f, t in atomic.types.items() if t is field_type and f not in exclude]


def _first_field(atomic: AtomicFile, candidates: tuple[str, ...]) -> str | None:
    return next(
        (f for f in candidates if f in atomic.types and atomic.types[f] is not FieldType.FLOAT_SEQ), None
    )


def _items(item: AtomicFile) -> pd.DataFrame:
    columns = item.columns
    category = _first_field(item, CATEGORY_FIELDS)
    title = _first_field(item, TITLE_FIELDS)
    brand, shop = _first_field(item, BRAND_FIELDS), _first_field(item, SHOP_FIELDS)
    items = pd.DataFrame({"item_id": columns[ITEM_ID]})
    items["category_id"] = [_category(v) for v in columns[category]] if category else UNKNOWN_CATEGORY
    items["brand_id"] = _text(columns[brand]) if brand else None
    items["shop_id"] = _text(columns[shop]) if shop else None
    items["title"] = _text(columns[title]) if title else None
    items["image_uri"] = None
    used = {ITEM_ID, category, title, brand, shop}
    return _add_profile_columns(items, item, used)


def _category(value) -> str:
    if isinstance(value, float):  # a float category field: its number as text, missing -> unknown
        return UNKNOWN_CATEGORY if math.isnan(value) else f"{value:g}"
    parts = value.split()
    return "|".join(parts) if parts else UNKNOWN_CATEGORY


def _text(values: list) -> list[str | None]:
    return [None if isinstance(v, float) and math.isnan(v) else (str(v) if v != "" else None) for v in values]


def _profile(user: AtomicFile) -> pd.DataFrame:
    return _add_profile_columns(pd.DataFrame({"user_id": user.columns[USER_ID]}), user, {USER_ID})


def _add_profile_columns(frame: pd.DataFrame, atomic: AtomicFile, used: set[str | None]) -> pd.DataFrame:
    """Float fields as numbers, token and token_seq fields as text; float_seq fields are left out."""
    skipped = []
    for field, field_type in atomic.types.items():
        if field in used:
            continue
        if field_type is FieldType.FLOAT:
            frame[field] = np.asarray(atomic.columns[field], dtype=np.float64)
        elif field_type is FieldType.FLOAT_SEQ:
            skipped.append(field)
        else:
            frame[field] = pd.array(_text(atomic.columns[field]), dtype="string")
    if skipped:
        log.info(
            "%s: float_seq field(s) %s not imported (no vector column in the contract)", atomic.path, skipped
        )
    return frame


def _complete(frame: pd.DataFrame, ids: pd.Series, key: str, defaults: dict, path: Path) -> pd.DataFrame:
    """``frame`` plus a row (defaults, else nulls) for every id the interactions name that it lacks."""
    missing = pd.Index(ids.unique()).difference(pd.Index(frame[key]))
    if not len(missing):
        return frame
    log.warning("%s lacks %d %s(s) that interactions name; added with defaults", path, len(missing), key)
    extra = pd.DataFrame({key: list(missing), **defaults})
    return pd.concat([frame, extra], ignore_index=True)
