"""DIN-protocol samples (the paper's Amazon protocol, after Zhou et al. 2018).

For a user's time-ordered behaviours x_1 .. x_T (positions 0 .. T-1 below):

- test:  predict x_T from x_1 .. x_{T-1}                      (target position T-1)
- valid: predict x_{T-1} from x_1 .. x_{T-2}                  (target position T-2)
- train: predict x_{j+1} from x_1 .. x_j, j = 1 .. T-3         (target positions 1 .. T-3)

The validation step is carved from the training range (the paper's j = T-2), never from test, so model
selection sees nothing the test sees. Every positive is paired with one negative: the same user, time and
history with an item the user never interacted with (at any time), drawn uniformly from the catalogue with
a seeded generator. Histories keep the newest ``max_history`` behaviours before the target.

Samples are arrow tables (histories are list columns; pandas would hold one Python object per entry):
user_id, item_id, label, ts, hist_item_ids, hist_behaviors, hist_ts, then the point-in-time statistics
(:mod:`marn.data.stats`): ``stat_<name>`` for the candidate and ``hist_stat_<name>`` (one value per
history position) for every statistic, each read from the newest snapshot stamped strictly before the
sample's time. A negative gets its item's statistics as of its positive's time; history items get theirs as
of the sample's time too, as serving reads every item's current statistics at request time.
:func:`marn.features.point_in_time.samples_from_feature_store` builds the same columns through Feast's
point-in-time join.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from marn.config import SamplesConfig
from marn.data.schema import TS, Dataset
from marn.data.stats import earliest_time, item_stat_table, stat_names, stats_before

SPLITS = ("train", "valid", "test")

STAT_COLUMN = "stat_{}"  # the candidate's value of a statistic, as of the sample's time
HIST_STAT_COLUMN = "hist_stat_{}"  # the same statistic of every history item, as of the sample's time

SAMPLE_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int8()),
        ("ts", TS),
        ("hist_item_ids", pa.list_(pa.string())),
        ("hist_behaviors", pa.list_(pa.string())),
        ("hist_ts", pa.list_(TS)),
    ]
)


@dataclass(frozen=True)
class Samples:
    train: pa.Table
    valid: pa.Table
    test: pa.Table

    def split(self, name: str) -> pa.Table:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def build_samples(dataset: Dataset, cfg: SamplesConfig) -> Samples:
    """Turn canonical events into DIN train/valid/test samples with sampled negatives and point-in-time
    statistics computed from the dataset's snapshots (:func:`marn.data.stats.item_stat_table`)."""
    protocol = _protocol(dataset, cfg)
    seq = protocol.sequences
    stats = item_stat_table(dataset, earliest_time(dataset))
    tables = {}
    for split, (rows, user_start, negatives) in protocol.targets.items():
        tables[split] = _split_table(rows, user_start, negatives, seq, cfg, stats)
    return Samples(**tables)


def sample_stat_names(table: pa.Table) -> list[str]:
    """The statistics a sample table carries, in column order."""
    prefix = STAT_COLUMN.format("")
    return [name[len(prefix) :] for name in table.column_names if name.startswith(prefix)]


def candidate_stat_columns(names: list[str], values: np.ndarray) -> dict[str, pa.Array]:
    """``stat_<name>`` columns from (N, F) values in ``names`` order (NaN -> null)."""
    return {
        STAT_COLUMN.format(name): pa.array(values[:, j], pa.float64(), from_pandas=True)
        for j, name in enumerate(names)
    }


def history_stat_columns(names: list[str], values: np.ndarray, offsets: np.ndarray) -> dict[str, pa.Array]:
    """``hist_stat_<name>`` list columns from (sum of history lengths, F) values, row r's history being
    ``values[offsets[r]:offsets[r + 1]]``."""
    arrow_offsets = pa.array(np.asarray(offsets, dtype=np.int32))
    return {
        HIST_STAT_COLUMN.format(name): pa.ListArray.from_arrays(
            arrow_offsets, pa.array(values[:, j], pa.float64(), from_pandas=True)
        )
        for j, name in enumerate(names)
    }


def sample_targets(dataset: Dataset, cfg: SamplesConfig) -> pd.DataFrame:
    """The targets of :func:`build_samples` without histories: user_id, item_id, label, ts, split.

    Same rows in the same order (train, valid, test; positive then its negative), so a history joined
    from elsewhere (Feast's point-in-time retrieval) yields the same samples.
    """
    protocol = _protocol(dataset, cfg)
    seq = protocol.sequences
    frames = []
    for split, (rows, _, negatives) in protocol.targets.items():
        pair, candidate, label = _pairs(rows, negatives, seq.items)
        frames.append(
            pd.DataFrame(
                {
                    "user_id": seq.users[rows][pair],
                    "item_id": candidate.astype(str),
                    "label": label,
                    "ts": pd.DatetimeIndex(seq.ts[rows][pair]).tz_localize("UTC"),
                    "split": split,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class _Sequences:
    """Events ordered by (user, ts, file row), as parallel arrays."""

    users: np.ndarray
    items: np.ndarray
    behaviors: np.ndarray
    ts: np.ndarray  # datetime64[us], UTC


@dataclass(frozen=True)
class _Protocol:
    sequences: _Sequences
    # split -> (target rows into the sequences, first row of each target's user, one negative per target)
    targets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def _protocol(dataset: Dataset, cfg: SamplesConfig) -> _Protocol:
    """Target positions per split and their seeded negatives: everything but the histories."""
    events = dataset.events
    if events.empty:
        raise ValueError("no events: cannot build samples from an empty events table")
    catalogue = pd.Index(dataset.items["item_id"].astype(str).unique())
    if len(catalogue) < 2:
        raise ValueError("the items table needs at least two items to sample negatives")

    # Time order within each user; ties keep file order so the protocol is deterministic.
    ordered = events.assign(_row=np.arange(len(events))).sort_values(["user_id", "ts", "_row"], kind="stable")
    seq = _Sequences(
        users=ordered["user_id"].astype(str).to_numpy(),
        items=ordered["item_id"].astype(str).to_numpy(),
        behaviors=ordered["behavior"].astype(str).to_numpy(),
        ts=pd.to_datetime(ordered["ts"], utc=True).dt.as_unit("us").dt.tz_localize(None).to_numpy(),
    )
    users = seq.users

    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])  # first row of each user
    lengths = np.diff(np.r_[starts, len(users)])
    keep = lengths >= cfg.min_events
    starts, lengths = starts[keep], lengths[keep]
    if len(starts) == 0:
        raise ValueError(f"no user has at least samples.min_events={cfg.min_events} events")

    # Target positions per split, as absolute row indices into the ordered arrays.
    test_rows = starts + lengths - 1
    valid_rows = starts + lengths - 2
    n_train = lengths - 3
    train_rows = np.repeat(starts, n_train) + 1 + concatenated_ranges(n_train)
    user_start = {"train": np.repeat(starts, n_train), "valid": starts, "test": starts}

    rng = np.random.default_rng(cfg.seed)
    seen = _user_item_keys(users, seq.items, catalogue)
    targets = {}
    for split, rows in (("train", train_rows), ("valid", valid_rows), ("test", test_rows)):
        negatives = _sample_negatives(users[rows], seen, catalogue, rng)  # draw order: train, valid, test
        targets[split] = (rows, user_start[split], negatives)
    return _Protocol(seq, targets)


def write_samples(out_dir: str | Path, samples: Samples) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = out_dir / f"{split}.parquet"
        pq.write_table(samples.split(split), paths[split])
    return paths


def read_samples(samples_dir: str | Path) -> Samples:
    samples_dir = Path(samples_dir)
    missing = [s for s in SPLITS if not (samples_dir / f"{s}.parquet").exists()]
    if missing:
        raise FileNotFoundError(f"{samples_dir}: missing sample split(s) {missing}")
    return Samples(**{s: pq.read_table(samples_dir / f"{s}.parquet") for s in SPLITS})


def concatenated_ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..c0), [0..c1), ... in one vectorised step."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - offsets


def _user_item_keys(users: np.ndarray, items: np.ndarray, catalogue: pd.Index) -> tuple[pd.Index, np.ndarray]:
    """Every (user, item) pair ever seen, as sorted int64 keys user_code * n_items + item_code."""
    user_index = pd.Index(pd.unique(users))
    keys = user_index.get_indexer(users).astype(np.int64) * len(catalogue) + catalogue.get_indexer(items)
    return user_index, np.unique(keys[catalogue.get_indexer(items) >= 0])


_MAX_REJECTION_ROUNDS = 32


def _sample_negatives(
    users: np.ndarray, seen: tuple[pd.Index, np.ndarray], catalogue: pd.Index, rng: np.random.Generator
) -> np.ndarray:
    """One uniformly drawn catalogue item per row that the row's user never interacted with."""
    user_index, seen_keys = seen
    n_items = len(catalogue)
    user_codes = user_index.get_indexer(users).astype(np.int64)
    codes = np.full(len(users), -1, dtype=np.int64)
    pending = np.arange(len(users))
    # Vectorised rejection sampling: each round redraws only the rows that hit an item the user touched.
    for _ in range(_MAX_REJECTION_ROUNDS):
        if len(pending) == 0:
            break
        draw = rng.integers(n_items, size=len(pending))
        keys = user_codes[pending] * n_items + draw
        hit = _contains(seen_keys, keys)
        codes[pending[~hit]] = draw[~hit]
        pending = pending[hit]
    # Users who touched nearly the whole catalogue: draw exactly among their unseen items.
    for row in pending:
        lo, hi = np.searchsorted(seen_keys, [user_codes[row] * n_items, (user_codes[row] + 1) * n_items])
        unseen = np.setdiff1d(np.arange(n_items), seen_keys[lo:hi] - user_codes[row] * n_items)
        if len(unseen) == 0:
            raise ValueError(f"user {users[row]!r} touched every item: no negative can be sampled")
        codes[row] = rng.choice(unseen)
    return catalogue.to_numpy()[codes].astype(str)


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, keys)
    return (pos < len(sorted_keys)) & (sorted_keys[np.minimum(pos, len(sorted_keys) - 1)] == keys)


def _pairs(rows: np.ndarray, negatives: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, ...]:
    """Positive then negative per target: the target index of each sample, its candidate item, its label."""
    n = len(rows)
    pair = np.repeat(np.arange(n), 2)  # interleave: positive, negative, positive, ...
    candidate = np.empty(2 * n, dtype=object)
    candidate[0::2], candidate[1::2] = items[rows], negatives
    label = np.tile(np.array([1, 0], dtype=np.int8), n)
    return pair, candidate, label


def _split_table(
    rows: np.ndarray,
    user_start: np.ndarray,
    negatives: np.ndarray,
    seq: _Sequences,
    cfg: SamplesConfig,
    stats: pd.DataFrame,
) -> pa.Table:
    """Positive then negative for each target row, both with the same history; statistics as of the
    target's time (``stats``: :func:`marn.data.stats.item_stat_table`)."""
    hist_start = np.maximum(user_start, rows - cfg.max_history)
    hist_len = rows - hist_start
    offsets = np.r_[0, np.cumsum(hist_len)].astype(np.int32)
    hist_idx = np.repeat(hist_start, hist_len) + concatenated_ranges(hist_len)

    def history(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[hist_idx], type=arrow_type))

    pair, candidate, label = _pairs(rows, negatives, seq.items)
    take = pa.array(pair)
    columns = [
        pa.array(seq.users[rows][pair], pa.string()),
        pa.array(candidate, pa.string()),
        pa.array(label, pa.int8()),
        pa.array(seq.ts[rows][pair], TS),
        history(seq.items, pa.string()).take(take),
        history(seq.behaviors, pa.string()).take(take),
        history(seq.ts, TS).take(take),
    ]
    table = pa.Table.from_arrays(columns, schema=SAMPLE_SCHEMA)
    names = stat_names(stats)
    target_ts = seq.ts[rows]
    per_target = stats_before(stats, seq.items[hist_idx], np.repeat(target_ts, hist_len))  # (sum L, F)
    stat_columns = candidate_stat_columns(
        names, stats_before(stats, candidate, target_ts[pair])
    )  # per sample
    for column, values in history_stat_columns(names, per_target, offsets).items():
        stat_columns[column] = values.take(take)  # a positive and its negative share the history
    for column, values in stat_columns.items():
        table = table.append_column(column, values)
    return table
