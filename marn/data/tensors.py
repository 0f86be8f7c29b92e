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

from marn.data.schema import BEHAVIORS

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
    tensors: dict[
        str, torch.Tensor
    ]  # item (N,), hist_items/hist_behavior/hist_gap (N, L), hist_len (N,), label

    def __len__(self) -> int:
        return len(self.users)

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


def gap_buckets(target_us: np.ndarray, behavior_us: np.ndarray) -> np.ndarray:
    """Time from each behaviour to the prediction (µs since the epoch) -> bucket codes 1..GAP_BUCKETS-1.
    Code 0 (PAD) means padding, or a behaviour whose time is unknown."""
    gap_s = (np.asarray(target_us, dtype=np.int64) - np.asarray(behavior_us, dtype=np.int64)) / 1e6
    return 1 + np.clip(np.log2(np.maximum(gap_s, 1.0)).astype(np.int64), 0, GAP_BUCKETS - 2)


def encode_samples(samples: pa.Table, catalog: ItemCatalog, max_history: int) -> EncodedSamples:
    """Encode one split. Histories are left-aligned and padded with PAD to ``max_history``."""
    n = samples.num_rows
    hist_items = samples.column("hist_item_ids").combine_chunks()
    full_len = pc.list_value_length(hist_items).to_numpy(zero_copy_only=False)
    lengths = np.minimum(full_len, max_history)  # keep the newest entries: the tail of each list
    list_offsets = hist_items.offsets.to_numpy()
    offsets = list_offsets[:-1] - list_offsets[0] + (full_len - lengths)  # flatten() starts at offsets[0]
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(offsets, lengths) + cols

    def padded(values: np.ndarray) -> torch.Tensor:
        out = np.full((n, max_history), PAD, dtype=np.int64)
        out[rows, cols] = values[flat]
        return torch.from_numpy(out)

    item_codes = catalog.items.encode(hist_items.flatten())
    behavior_codes = Vocab(BEHAVIORS).encode(samples.column("hist_behaviors").combine_chunks().flatten())
    target_ts = samples.column("ts").to_numpy().astype("datetime64[us]").astype(np.int64)
    hist_ts = samples.column("hist_ts").combine_chunks().flatten().to_numpy().astype("datetime64[us]")
    gap_bucket = gap_buckets(np.repeat(target_ts, full_len), hist_ts.astype(np.int64))

    tensors = {
        "item": torch.from_numpy(catalog.items.encode(samples.column("item_id"))),
        "hist_items": padded(item_codes),
        "hist_behavior": padded(behavior_codes),
        "hist_gap": padded(gap_bucket),
        "hist_len": torch.from_numpy(lengths.astype(np.int64)),
        "label": torch.from_numpy(samples.column("label").to_numpy().astype(np.float32)),
    }
    users = samples.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    return EncodedSamples(users, tensors)
