"""Encoding samples into tensors: vocabularies, padding, truncation, cold ids, time-gap buckets."""

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from marn.config import SamplesConfig
from marn.data.samples import SAMPLE_SCHEMA, build_samples
from marn.data.schema import Dataset
from marn.data.tensors import PAD, ItemCatalog, Vocab, encode_samples

ITEMS = pd.DataFrame(
    {
        "item_id": ["a", "b", "c", "d", "e"],
        "category_id": ["x", "x", "y", "y", "z"],
        "brand_id": ["p", None, "q", "q", None],
        "shop_id": [None] * 5,
    }
)


def test_vocab_reserves_zero_for_padding_and_unknowns():
    vocab = Vocab.build(["b", "a", "b", None])
    assert len(vocab) == 3
    assert vocab.encode(["a", "b", "zzz", None]).tolist() == [1, 2, PAD, PAD]


def test_catalog_maps_items_to_attribute_codes_and_round_trips():
    catalog = ItemCatalog.from_items(ITEMS)
    code = catalog.items.encode(["c"])[0]
    cat, brand, shop = catalog.attributes[code]
    assert (
        catalog.categories.values[cat - 1] == "y" and catalog.brands.values[brand - 1] == "q" and shop == PAD
    )
    assert (catalog.attributes[PAD] == 0).all()
    again = ItemCatalog.from_dict(catalog.to_dict())
    assert again.items == catalog.items and (again.attributes == catalog.attributes).all()


def test_histories_keep_the_newest_entries_left_aligned_and_padded():
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    row = {
        "user_id": "u",
        "item_id": "e",
        "label": 1,
        "ts": t0 + pd.Timedelta(seconds=1024),
        "hist_item_ids": ["a", "b", "unknown", "d"],
        "hist_behaviors": ["click", "cart", "purchase", "click"],
        "hist_ts": [t0, t0, t0 + pd.Timedelta(seconds=1016), t0 + pd.Timedelta(seconds=1023)],
    }
    table = pa.Table.from_pylist(
        [row, {**row, "hist_item_ids": ["a"], "hist_behaviors": ["click"], "hist_ts": [t0]}],
        schema=SAMPLE_SCHEMA,
    )
    catalog = ItemCatalog.from_items(ITEMS)
    enc = encode_samples(table.slice(0, 2), catalog, max_history=3)
    t = enc.tensors
    codes = catalog.items.encode(["b", "d", "a"]).tolist()
    assert t["hist_items"][0].tolist() == [codes[0], PAD, codes[1]]  # newest three; unknown -> PAD
    assert t["hist_items"][1].tolist() == [codes[2], PAD, PAD]
    assert t["hist_len"].tolist() == [3, 1]
    # gaps 1024 s, 8 s, 1 s -> buckets 1 + log2: 11, 4, 1
    assert t["hist_gap"][0].tolist() == [11, 4, 1]
    assert t["hist_behavior"][0, 0] != t["hist_behavior"][0, 2]
    assert t["label"].dtype == torch.float32 and enc.users.tolist() == ["u", "u"]


def test_encoding_works_on_sliced_tables_from_the_protocol():
    ts = pd.date_range("2025-01-01", periods=5, freq="D", tz="UTC")
    events = pd.DataFrame(
        {"user_id": ["u1"] * 5, "item_id": ["a", "b", "c", "a", "b"], "behavior": "click", "ts": ts}
    )
    events = pd.concat([events, events.assign(user_id="u2", item_id=["c", "d", "a", "b", "c"])])
    samples = build_samples(Dataset(events=events, items=ITEMS), SamplesConfig(min_events=4))
    catalog = ItemCatalog.from_items(ITEMS)
    full = encode_samples(samples.train, catalog, max_history=2)
    part = encode_samples(samples.train.slice(2), catalog, max_history=2)
    assert torch.equal(part.tensors["hist_items"], full.tensors["hist_items"][2:])
    assert np.array_equal(part.users, full.users[2:])
