"""DIN protocol: split positions, no leakage from the future or from test, negatives the user never saw."""

import numpy as np
import pandas as pd
import pytest

from marn.config import SamplesConfig
from marn.data.samples import build_samples, read_samples, write_samples
from marn.data.schema import Dataset


def _dataset(n_users: int = 30, n_items: int = 40, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    rows = []
    base = pd.Timestamp("2025-01-01", tz="UTC")
    for u in range(n_users):
        length = int(rng.integers(3, 12))
        picks = rng.choice(n_items, size=length, replace=False)
        times = np.sort(rng.integers(0, 10_000_000, size=length))
        for item, t in zip(picks, times, strict=True):
            rows.append((f"u{u}", f"i{item}", "click", base + pd.Timedelta(seconds=int(t))))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "behavior", "ts"])
    events = events.sample(frac=1.0, random_state=1)  # file order must not matter
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "category_id": "c"})
    return Dataset(events=events, items=items)


def _pairs(table):
    return table.to_pandas()


def test_split_positions_follow_the_protocol():
    data = _dataset()
    cfg = SamplesConfig(max_history=50, min_events=4, seed=3)
    samples = build_samples(data, cfg)
    sequences = {u: g.sort_values("ts")["item_id"].tolist() for u, g in data.events.groupby("user_id")}
    eligible = {u: s for u, s in sequences.items() if len(s) >= 4}
    test = _pairs(samples.test)
    valid = _pairs(samples.valid)
    train = _pairs(samples.train)
    assert set(test["user_id"]) == set(eligible)
    for u, seq in eligible.items():
        t = test[(test.user_id == u) & (test.label == 1)].iloc[0]
        assert t.item_id == seq[-1] and list(t.hist_item_ids) == seq[:-1]
        v = valid[(valid.user_id == u) & (valid.label == 1)].iloc[0]
        assert v.item_id == seq[-2] and list(v.hist_item_ids) == seq[:-2]
        tr = train[(train.user_id == u) & (train.label == 1)]
        assert tr["item_id"].tolist() == seq[1:-2]
        assert [list(h) for h in tr["hist_item_ids"]] == [seq[:j] for j in range(1, len(seq) - 2)]
    # Two samples per target: one positive, one negative with the same history.
    for table in (train, valid, test):
        assert (table["label"].to_numpy() == np.tile([1, 0], len(table) // 2)).all()


def test_no_leakage_histories_are_strictly_earlier_and_test_items_unseen_in_training_targets():
    data = _dataset(seed=5)
    samples = build_samples(data, SamplesConfig(min_events=4))
    for name in ("train", "valid", "test"):
        table = samples.split(name)
        for ts, hist_ts in zip(table["ts"].to_pylist(), table["hist_ts"].to_pylist(), strict=True):
            assert all(h <= ts for h in hist_ts)
    test = _pairs(samples.test)
    train = _pairs(samples.train)
    for u, g in test[test.label == 1].groupby("user_id"):
        test_item = g.item_id.iloc[0]
        # The test target never appears in the user's own history nor as a training target of that user.
        assert test_item not in list(g.hist_item_ids.iloc[0])
        assert test_item not in set(train[(train.user_id == u) & (train.label == 1)].item_id)
        assert (train[train.user_id == u].ts <= g.ts.iloc[0]).all()


def test_negatives_exclude_everything_the_user_touched_and_are_seeded():
    data = _dataset(n_users=50, n_items=15, seed=7)  # dense: users touch many of the 15 items
    cfg = SamplesConfig(min_events=4, seed=11)
    samples = build_samples(data, cfg)
    touched = data.events.groupby("user_id")["item_id"].agg(set)
    for name in ("train", "valid", "test"):
        df = _pairs(samples.split(name))
        neg = df[df.label == 0]
        assert not any(item in touched[u] for u, item in zip(neg.user_id, neg.item_id, strict=True))
        assert set(neg.item_id) <= set(data.items.item_id)
    again = build_samples(data, cfg)
    assert again.train.equals(samples.train)
    other = build_samples(data, SamplesConfig(min_events=4, seed=12))
    assert not other.train.equals(samples.train)


def test_history_is_truncated_to_the_newest_behaviours():
    data = _dataset(seed=9)
    samples = build_samples(data, SamplesConfig(max_history=2, min_events=4))
    test = _pairs(samples.test)
    for _, row in test[test.label == 1].iterrows():
        seq = data.events[data.events.user_id == row.user_id].sort_values("ts").item_id.tolist()
        assert list(row.hist_item_ids) == seq[-3:-1]


def test_users_without_enough_events_are_dropped_and_empty_input_is_an_error():
    data = _dataset()
    lengths = data.events.groupby("user_id").size()
    samples = build_samples(data, SamplesConfig(min_events=6))
    assert set(samples.test.column("user_id").to_pylist()) == set(lengths[lengths >= 6].index)
    with pytest.raises(ValueError, match="no user has at least"):
        build_samples(data, SamplesConfig(min_events=100))
    with pytest.raises(ValueError, match="empty"):
        build_samples(Dataset(events=data.events.iloc[:0], items=data.items), SamplesConfig())


def test_user_who_touched_every_item_is_a_clear_error():
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "category_id": "c"})
    ts = pd.date_range("2025-01-01", periods=4, freq="h", tz="UTC")
    events = pd.DataFrame({"user_id": "u", "item_id": ["a", "b", "c", "d"], "behavior": "click", "ts": ts})
    with pytest.raises(ValueError, match="touched every item"):
        build_samples(Dataset(events=events, items=items), SamplesConfig(min_events=4))


def test_round_trip_through_parquet(tmp_path):
    samples = build_samples(_dataset(), SamplesConfig())
    write_samples(tmp_path, samples)
    back = read_samples(tmp_path)
    assert back.test.equals(samples.test)
    with pytest.raises(FileNotFoundError, match="missing sample split"):
        read_samples(tmp_path / "nowhere")
