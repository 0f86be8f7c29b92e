"""From DIN samples (arrow) to model-ready tensors.

Vocabularies reserve code 0 for padding and for ids unseen when the vocabulary was built (cold items),
so a model can embed both with one table. Item attributes (category, brand, shop) are looked up through
the item code inside the model (``ItemCatalog.attributes``), so samples carry only item codes.

Notation: N samples, L = max history length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from marn.data.samples import HIST_STAT_COLUMN, STAT_COLUMN, sample_stat_names
from marn.data.schema import BEHAVIORS
from marn.data.stats import StatDiscretizer, stat_names, stats_before

PAD = 0  # padding and unknown ids
GAP_BUCKETS = 24  # log2-second buckets of the time from a behaviour to the prediction (1 s .. ~100 days)


@dataclass(frozen=True)
class Vocab:
    """Strings -> codes 1..n; anything else -> PAD."""

    values: tuple[str, ...]

    @classmethod
    def build(cls, values: Any) -> Vocab:
        series = pd.Series(values, dtype="string").dropna()
        return cls(tuple(sorted(series.unique())))

    def __len__(self) -> int:
        return len(self.values) + 1  # + PAD

    def encode(self, values: pa.Array | pa.ChunkedArray | np.ndarray | list) -> np.ndarray:
        if not isinstance(values, pa.Array | pa.ChunkedArray):
            values = pa.array(values, pa.string())
        index = pc.index_in(values, value_set=pa.array(self.values, pa.string()))
        return (pc.fill_null(index, -1).to_numpy(zero_copy_only=False) + 1).astype(np.int64)


@dataclass(frozen=True)
class ItemCatalog:
    """Item vocabulary plus each item's attribute codes (category, brand, shop)."""

    items: Vocab
    categories: Vocab
    brands: Vocab
    shops: Vocab
    attributes: np.ndarray  # (n_items + 1, 3) int64: category, brand, shop code per item code

    @classmethod
    def from_items(cls, items: pd.DataFrame) -> ItemCatalog:
        items = items.drop_duplicates("item_id")
        vocab = {col: Vocab.build(items[col]) for col in ("item_id", "category_id", "brand_id", "shop_id")}
        codes = vocab["item_id"].encode(items["item_id"].astype(str).tolist())
        attributes = np.zeros((len(vocab["item_id"]), 3), dtype=np.int64)
        for j, col in enumerate(("category_id", "brand_id", "shop_id")):
            column = items[col].astype("string").astype(object).where(items[col].notna(), None).tolist()
            attributes[codes, j] = vocab[col].encode(column)
        return cls(vocab["item_id"], vocab["category_id"], vocab["brand_id"], vocab["shop_id"], attributes)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for a checkpoint (torch.load(weights_only=True) accepts them)."""
        return {
            "items": list(self.items.values),
            "categories": list(self.categories.values),
            "brands": list(self.brands.values),
            "shops": list(self.shops.values),
            "attributes": self.attributes.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemCatalog:
        return cls(
            Vocab(tuple(data["items"])),
            Vocab(tuple(data["categories"])),
            Vocab(tuple(data["brands"])),
            Vocab(tuple(data["shops"])),
            np.asarray(data["attributes"], dtype=np.int64),
        )


@dataclass(frozen=True)
class EncodedSamples:
    users: np.ndarray  # (N,) user ids as strings, for per-user metrics
    times: np.ndarray  # (N,) datetime64[us] sample times (UTC), for point-in-time look-ups
    # item (N,), item_stats (N, F, G) int16, hist_items/hist_behavior/hist_gap (N, L),
    # hist_stats (N, L, F, G) int16, hist_len (N,), label (N,)
    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def subset(self, index: torch.Tensor) -> EncodedSamples:
        """The samples at ``index`` (a 1-D tensor of positions), in that order."""
        rows = index.numpy()
        return EncodedSamples(self.users[rows], self.times[rows], self.batch(index))

    def request_groups(self) -> torch.Tensor:
        """(N,) a group number per sample: samples of one user at one moment (a target's positive and its
        sampled negative) have the same history input, so the models run that history once per batch
        when the group stays together (see :meth:`shuffled`). Numbered in order of first appearance."""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.long)
        users = pd.factorize(self.users)[0]
        keys = np.stack([users, self.times.astype("datetime64[us]").astype(np.int64)], axis=1)  # (N, 2)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        return torch.from_numpy(rank[inverse.reshape(-1)])

    def shuffled(self, generator: torch.Generator, groups: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) a seeded random order of the samples that shuffles whole request groups and keeps each
        group's samples adjacent, in their stored order; ``groups`` is :meth:`request_groups`, when the
        caller keeps it across epochs."""
        groups = self.request_groups() if groups is None else groups
        n_groups = int(groups.max()) + 1 if len(groups) else 0
        position = torch.empty(n_groups, dtype=torch.long)
        position[torch.randperm(n_groups, generator=generator)] = torch.arange(n_groups)
        return torch.sort(position[groups], stable=True).indices


def gap_buckets(target_us: np.ndarray, behavior_us: np.ndarray) -> np.ndarray:
    """Time from each behaviour to the prediction (µs since the epoch) -> bucket codes 1..GAP_BUCKETS-1.
    Code 0 (PAD) means padding, or a behaviour whose time is unknown.

    Whole seconds on both sides: Feast's online store keeps timestamps to the second, so serving sees
    behaviour times truncated, and the gap must be the same number offline."""
    seconds = (
        np.asarray(target_us, dtype=np.int64) // 10**6 - np.asarray(behavior_us, dtype=np.int64) // 10**6
    )
    gap_s = seconds.astype(np.float64)
    return 1 + np.clip(np.log2(np.maximum(gap_s, 1.0)).astype(np.int64), 0, GAP_BUCKETS - 2)


def stat_codes(
    table: pd.DataFrame, item_ids: np.ndarray, times: np.ndarray, statistics: StatDiscretizer
) -> np.ndarray:
    """(n, F, G) bucket codes of each (item, t) read from a :func:`marn.data.stats.item_stat_table` as of the
    newest snapshot before t, in the discretizer's statistic order."""
    names = stat_names(table)
    missing = [name for name in statistics.names if name not in names]
    if missing:
        raise ValueError(f"the statistic table lacks {missing}, which the model was trained on")
    values = stats_before(table, item_ids, times)[:, [names.index(name) for name in statistics.names]]
    return statistics.transform(values)


def fit_statistics(train: pa.Table, buckets: tuple[int, ...]) -> StatDiscretizer:
    """The bucket boundaries of every statistic the training samples carry, fitted on them alone: one value
    per distinct item state (item and statistics) that a training sample reads, candidate or history."""
    names = sample_stat_names(train)
    items = [train.column("item_id").to_numpy(zero_copy_only=False)]
    items.append(train.column("hist_item_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    frame = pd.DataFrame({"item_id": np.concatenate(items).astype(str)})
    for name in names:
        candidate = train.column(STAT_COLUMN.format(name)).to_numpy().astype(np.float64)
        history = train.column(HIST_STAT_COLUMN.format(name)).combine_chunks().flatten()
        frame[name] = np.concatenate([candidate, history.to_numpy(zero_copy_only=False).astype(np.float64)])
    states = frame.drop_duplicates()
    return StatDiscretizer.fit(names, states[names].to_numpy(dtype=np.float64), buckets)


def encode_samples(
    samples: pa.Table, catalog: ItemCatalog, max_history: int, statistics: StatDiscretizer
) -> EncodedSamples:
    """Encode one split. Histories are left-aligned and padded with PAD to ``max_history``.

    The point-in-time statistics the samples carry (``stat_<name>``, ``hist_stat_<name>``) become bucket
    codes with ``statistics`` (fitted on the training split): ``item_stats`` (N, F, G) for the candidate and
    ``hist_stats`` (N, L, F, G) for the history, 0 for padding. Raises ValueError when the samples lack a
    statistic the discretizer (the model) needs.
    """
    n = samples.num_rows
    missing = [name for name in statistics.names if name not in sample_stat_names(samples)]
    if missing:
        raise ValueError(
            f"the samples lack the statistic(s) {missing} this model was trained on (they carry "
            f"{sample_stat_names(samples)}); build them from a dataset with the same statistics"
        )
    hist_items = samples.column("hist_item_ids").combine_chunks()
    full_len = pc.list_value_length(hist_items).to_numpy(zero_copy_only=False)
    lengths = np.minimum(full_len, max_history)  # keep the newest entries: the tail of each list
    starts = np.cumsum(full_len) - full_len  # where each row's list begins in flatten()
    offsets = starts + (full_len - lengths)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(offsets, lengths) + cols

    def padded(values: np.ndarray) -> torch.Tensor:
        out = np.full((n, max_history, *values.shape[1:]), PAD, dtype=values.dtype)
        out[rows, cols] = values[flat]
        return torch.from_numpy(out)

    def stat_values(template: str, history: bool) -> np.ndarray:  # (N or sum of full_len, F) raw values
        columns = []
        for name in statistics.names:
            column = samples.column(template.format(name)).combine_chunks()
            if history:
                if not np.array_equal(pc.list_value_length(column).to_numpy(zero_copy_only=False), full_len):
                    raise ValueError(f"{template.format(name)}: list lengths differ from hist_item_ids'")
                column = column.flatten()
            columns.append(column.to_numpy(zero_copy_only=False).astype(np.float64))
        size = int(full_len.sum()) if history else n
        return np.stack(columns, axis=1) if columns else np.zeros((size, 0))

    item_codes = catalog.items.encode(hist_items.flatten())
    behavior_codes = Vocab(BEHAVIORS).encode(samples.column("hist_behaviors").combine_chunks().flatten())
    target_ts = samples.column("ts").to_numpy().astype("datetime64[us]").astype(np.int64)
    hist_ts = samples.column("hist_ts").combine_chunks().flatten().to_numpy().astype("datetime64[us]")
    gap_bucket = gap_buckets(np.repeat(target_ts, full_len), hist_ts.astype(np.int64))

    tensors = {
        "item": torch.from_numpy(catalog.items.encode(samples.column("item_id"))),
        "item_stats": torch.from_numpy(statistics.transform(stat_values(STAT_COLUMN, history=False))),
        "hist_items": padded(item_codes),
        "hist_stats": padded(statistics.transform(stat_values(HIST_STAT_COLUMN, history=True))),
        "hist_behavior": padded(behavior_codes),
        "hist_gap": padded(gap_bucket),
        "hist_len": torch.from_numpy(lengths.astype(np.int64)),
        "label": torch.from_numpy(samples.column("label").to_numpy().astype(np.float32)),
    }
    users = samples.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    return EncodedSamples(users, target_ts.astype("datetime64[us]"), tensors)
