"""Encoding samples into tensors: vocabularies, padding, truncation, cold ids, time-gap buckets."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from marn.config import SamplesConfig
from marn.data.samples import SAMPLE_SCHEMA, build_samples
from marn.data.schema import Dataset
from marn.data.stats import StatDiscretizer
from marn.data.tensors import PAD, ItemCatalog, Vocab, encode_samples, fit_statistics

NO_STATISTICS = StatDiscretizer((), (10, 100), ())  # hand-made rows without statistic columns

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
    enc = encode_samples(table.slice(0, 2), catalog, max_history=3, statistics=NO_STATISTICS)
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
    statistics = fit_statistics(samples.train, (3, 5))
    full = encode_samples(samples.train, catalog, max_history=2, statistics=statistics)
    part = encode_samples(samples.train.slice(2), catalog, max_history=2, statistics=statistics)
    for name in ("hist_items", "hist_stats", "item_stats"):
        assert torch.equal(part.tensors[name], full.tensors[name][2:]), name
    assert np.array_equal(part.users, full.users[2:])


def test_statistics_are_bucketed_for_the_candidate_and_each_kept_history_entry():
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    row = {
        "user_id": "u",
        "item_id": "e",
        "label": 1,
        "ts": t0,
        "hist_item_ids": ["a", "b", "d"],
        "hist_behaviors": ["click"] * 3,
        "hist_ts": [t0] * 3,
    }
    table = pa.Table.from_pylist([row], schema=SAMPLE_SCHEMA)
    table = table.append_column("stat_n_events", pa.array([7.0]))
    table = table.append_column("hist_stat_n_events", pa.array([[0.0, 3.0, 9.0]], pa.list_(pa.float64())))
    statistics = StatDiscretizer.fit(["n_events"], np.array([[0.0], [3.0], [6.0], [9.0]]), (2, 4))
    catalog = ItemCatalog.from_items(ITEMS)
    t = encode_samples(table, catalog, max_history=2, statistics=statistics).tensors
    assert t["item_stats"].shape == (1, 1, 2) and t["item_stats"][0, 0].tolist() == [2, 4]
    # the newest two history entries (3 and 9 events), then nothing
    assert t["hist_stats"][0, :, 0].tolist() == [[1, 2], [2, 4]]
    with pytest.raises(ValueError, match="lack the statistic"):
        encode_samples(table.drop_columns(["stat_n_events"]), catalog, 2, statistics)
