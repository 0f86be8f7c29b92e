"""Metrics against hand-computed values."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.stats import StatDiscretizer
from marn.data.tensors import EncodedSamples, ItemCatalog, Vocab
from marn.evaluate import (
    auc,
    auc_by_popularity,
    ctr_metrics,
    logloss,
    recall_at_n,
    training_item_counts,
    unseen_item_recall,
    user_auc,
)
from marn.models import CTRModel, ModelOutput


def test_user_auc_is_the_unweighted_mean_of_per_user_aucs():
    users = np.array(["a"] * 4 + ["b"] * 2 + ["c"] * 2)
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 1])  # c has one class only: left out
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.7, 0.5, 0.4])
    # a: positives 0.9, 0.2 vs negatives 0.8, 0.1 -> 3 of 4 pairs; b: 0 of 1
    assert user_auc(users, labels, scores) == pytest.approx((0.75 + 0.0) / 2)


def test_user_auc_ties_count_half_and_matches_sklearn_per_user():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(20).astype(str), 10)
    labels = rng.integers(0, 2, size=200)
    scores = np.round(rng.random(200), 1)  # many ties
    expected = np.mean(
        [
            roc_auc_score(labels[users == u], scores[users == u])
            for u in np.unique(users)
            if 0 < labels[users == u].sum() < 10
        ]
    )
    assert user_auc(users, labels, scores) == pytest.approx(expected)
    assert user_auc(np.array(["a", "a"]), np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_undefined_cases_are_nan_not_a_made_up_number():
    assert math.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert math.isnan(user_auc(np.array(["a", "b"]), np.array([1, 0]), np.array([0.2, 0.3])))


def test_logloss_and_bundle():
    labels = np.array([1, 0])
    assert logloss(labels, np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert logloss(labels, np.array([1.0, 0.0])) < 1e-5  # clipped, finite
    m = ctr_metrics(np.array(["a", "a"]), labels, np.array([0.8, 0.3]))
    assert m["auc"] == 1.0 and m["user_auc"] == 1.0 and m["samples"] == 2 and m["positive_rate"] == 0.5


# --- AUC by item-popularity level (paper Table 4) ---------------------------------------------------------


def test_auc_by_popularity_levels_by_training_count_and_their_aucs():
    items = np.array([1, 1, 2, 3, 4, 4])
    labels = np.array([1, 0, 0, 1, 0, 0])
    scores = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.2])
    counts = np.array([0, 1, 2, 3, 4])  # indexed by item code
    levels = auc_by_popularity(items, labels, scores, counts, levels=2)
    # level 0 = items 1, 2: the positive 0.9 beats both negatives;
    # level 1 = items 3, 4: the positive 0.2 vs 0.8 (0), vs 0.2 (1/2)
    assert levels == [
        {"level": 0, "auc": 1.0, "samples": 3, "items": 2, "min_count": 1, "max_count": 2},
        {"level": 1, "auc": 0.25, "samples": 3, "items": 2, "min_count": 3, "max_count": 4},
    ]
    as_mapping = auc_by_popularity(items, labels, scores, {1: 1, 2: 2, 3: 3, 4: 4}, levels=2)
    as_series = auc_by_popularity(items, labels, scores, pd.Series({4: 4, 3: 3, 2: 2, 1: 1}), levels=2)
    assert as_mapping == levels and as_series == levels
    # popularity comes from the counts given, not from the test samples: reversed counts swap the levels
    swapped = auc_by_popularity(items, labels, scores, np.array([0, 4, 3, 2, 1]), levels=2)
    assert [lv["auc"] for lv in swapped] == [0.25, 1.0]


def test_auc_by_popularity_level_without_both_classes_and_empty_levels():
    items, labels, scores = np.array([1, 1, 2, 2]), np.array([1, 0, 0, 0]), np.array([0.6, 0.4, 0.3, 0.2])
    two = auc_by_popularity(items, labels, scores, {1: 5, 2: 9}, levels=2)
    assert [lv["auc"] for lv in two] == [1.0, None]  # level 1 has negatives only
    # fewer distinct items than levels: equal-frequency cuts at floor(k * 2 / 4) = 0, 1, 1
    four = auc_by_popularity(items, labels, scores, {1: 5, 2: 9}, levels=4)
    assert [lv["items"] for lv in four] == [0, 1, 0, 1]
    assert four[0] == {
        "level": 0,
        "auc": None,
        "samples": 0,
        "items": 0,
        "min_count": None,
        "max_count": None,
    }
    assert four[1]["samples"] == 2 and four[1]["min_count"] == 5 and four[3]["max_count"] == 9
    one = auc_by_popularity(items, labels, scores, {}, levels=1)  # absent items count 0
    assert one == [{"level": 0, "auc": 1.0, "samples": 4, "items": 2, "min_count": 0, "max_count": 0}]


def test_auc_by_popularity_keeps_ties_together_within_half_a_level_else_splits_by_code():
    counts = {1: 3, 2: 0, 3: 3, 4: 1, 5: 0, 6: 3, 7: 2, 8: 0, 9: 3, 10: 1}
    # by (count, code): 2 5 8 | 4 10 | 7 | 1 3 6 9  (count groups 0, 1, 2, 3)
    # equal-frequency cuts at 2, 4, 6, 8 (level size 2, half a level 1):
    #   2 splits the zeros [0, 3): nearer edge 3 -> cut 3
    #   4 splits the ones [3, 5): draw, lower edge 3 is not after the previous cut 3 -> upper edge 5
    #   6 is already a group edge
    #   8 splits the threes [6, 10): both edges 2 away -> stays, codes 1, 3 below 6, 9
    items = np.repeat(np.arange(1, 11), np.arange(1, 11))  # code c has c samples: tells levels apart
    labels = np.zeros(len(items))
    labels[::2] = 1
    levels = auc_by_popularity(items, labels, np.arange(len(items)) % 7, counts, levels=5)
    assert [lv["items"] for lv in levels] == [3, 2, 1, 2, 2]
    assert [lv["samples"] for lv in levels] == [2 + 5 + 8, 4 + 10, 7, 1 + 3, 6 + 9]
    assert [(lv["min_count"], lv["max_count"]) for lv in levels] == [(0, 0), (1, 1), (2, 2), (3, 3), (3, 3)]
    # a cut in the middle of a group moves to its lower edge: counts 0 | 1 1 2, not 0 1 1 | 2
    draw = auc_by_popularity(
        np.arange(1, 5), np.array([1, 0, 1, 0]), np.zeros(4), {2: 1, 3: 1, 4: 2}, levels=2
    )
    assert [lv["items"] for lv in draw] == [1, 3]


@pytest.mark.parametrize("seed", range(5))
def test_auc_by_popularity_levels_partition_the_items_in_popularity_order(seed):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, 200, size=2000)
    counts = np.floor(rng.pareto(1.0, size=200)).astype(int)  # long tail: many ties at 0 and 1
    levels = auc_by_popularity(items, rng.integers(0, 2, 2000), rng.random(2000), counts, levels=10)
    assert sum(lv["samples"] for lv in levels) == 2000
    assert sum(lv["items"] for lv in levels) == len(np.unique(items))
    assert all(lv["items"] >= 1 for lv in levels)
    assert all(a["max_count"] <= b["min_count"] for a, b in itertools.pairwise(levels))
    size = len(np.unique(items)) / 10
    assert all(lv["items"] <= 2 * size for lv in levels)  # each cut moves at most half a level


def test_auc_by_popularity_rejects_bad_input():
    one = np.array([1, 2])
    with pytest.raises(ValueError, match="lengths differ"):
        auc_by_popularity(one, np.array([1, 0, 1]), np.array([0.1, 0.2]), np.array([0, 1, 2]))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="levels"):
            auc_by_popularity(one, np.array([1, 0]), np.array([0.1, 0.2]), np.array([0, 1, 2]), levels=bad)
    with pytest.raises(ValueError, match="outside item_counts"):
        auc_by_popularity(one, np.array([1, 0]), np.array([0.1, 0.2]), np.array([0, 1]))


def _samples(users, items, labels, hist_items, hist_len) -> EncodedSamples:
    hist = torch.tensor(hist_items)
    return EncodedSamples(
        np.array(users),
        np.arange(len(users)).astype("datetime64[D]").astype("datetime64[us]"),
        {
            "item": torch.tensor(items),
            "item_stats": torch.zeros(len(items), 1, 2, dtype=torch.int16),
            "hist_items": hist,
            "hist_stats": torch.zeros(*hist.shape, 1, 2, dtype=torch.int16),
            "hist_behavior": torch.ones_like(hist),
            "hist_gap": torch.ones_like(hist),
            "hist_len": torch.tensor(hist_len),
            "label": torch.tensor(labels, dtype=torch.float32),
        },
    )


def test_training_item_counts_counts_positive_candidates_and_histories_inside_hist_len():
    train = _samples(
        ["a", "a", "b"],
        [3, 4, 2],
        [1, 0, 1],
        [[1, 2, 0], [1, 2, 0], [1, 5, 5]],  # the 5s lie beyond hist_len: not counted
        [2, 2, 1],
    )
    # candidates of positives: 3, 2 (the negative's 4 is no interaction); histories: 1 1 1, 2 2
    assert training_item_counts(train, 6).tolist() == [0, 3, 3, 1, 0, 0]
    assert training_item_counts(train, 6, histories=False).tolist() == [0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="n_items"):
        training_item_counts(train, 3)  # code 3 occurs: the table needs 4 rows


# --- recall@N of items unseen in training (paper Table 5) -------------------------------------------------


def test_recall_at_n_counts_ties_against_the_target():
    scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.7, 0.2], [0.3, 0.2, 0.1]])
    # ranks: user 0: 0.9 above 0.5 -> 2; user 1: the tie 0.7 ranks above the target -> 2; user 2: 1
    assert recall_at_n(scores, np.array([2, 0, 0]), [1, 2, 3]) == pytest.approx({1: 1 / 3, 2: 1.0, 3: 1.0})
    constant = recall_at_n(np.zeros((4, 5)), np.arange(4), (1, 4, 5, 10))
    assert constant == {1: 0.0, 4: 0.0, 5: 1.0, 10: 1.0}  # a constant scorer ranks its target last


def test_recall_at_n_without_users_is_nan_and_bad_input_raises():
    empty = recall_at_n(np.empty((0, 5)), np.empty(0, dtype=np.int64), [10])
    assert list(empty) == [10] and math.isnan(empty[10])
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="targets must be"):
        recall_at_n(scores, np.array([0, 3]), [1])
    with pytest.raises(ValueError, match="targets must be"):
        recall_at_n(scores, np.array([0]), [1])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_n(np.array([[np.nan, 0.0]]), np.array([0]), [1])
    for ns in ([], [0], [2.5]):
        with pytest.raises(ValueError, match="ns must be"):
            recall_at_n(scores, np.array([0, 1]), ns)


ITEM_SCORE = [0.0, 0.3, 0.2, 0.4, 0.0, 0.1, 0.5, 0.9, 0.5]  # logit per item code 0..8


class FixedScore(CTRModel):
    """Logit = a fixed score per candidate code, + 10 when the candidate is the first history item, so a
    user paired with the wrong history would rank differently. Records how it is called."""

    def __init__(self) -> None:
        n = len(ITEM_SCORE)
        catalog = ItemCatalog(
            Vocab(tuple(f"i{c}" for c in range(1, n))), Vocab(()), Vocab(()), Vocab(()), np.zeros((n, 3), int)
        )
        features = ItemFeatures(
            np.zeros((n, 1), np.float32),
            np.zeros((n, 1), np.int64),
            np.zeros((1, 1), np.float32),
            StatDiscretizer(("n_events",), (3, 5), ((), ())),
            "embeddings",
        )
        super().__init__(catalog, features, ModelConfig())
        self.register_buffer("score", torch.tensor(ITEM_SCORE))
        self.calls: list[tuple[int, bool, bool]] = []
        self.stats_seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        self.calls.append((len(batch["item"]), self.training, torch.is_grad_enabled()))
        self.stats_seen.append((batch["item"], batch["item_stats"]))
        first = torch.where(batch["hist_len"] > 0, batch["hist_items"][:, 0], -1)
        return ModelOutput(self.score[batch["item"]] + 10.0 * (batch["item"] == first))


def pool_stats(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """(U, C, 1, 2) codes: each pool item's own (item code mod 3, and the user row)."""
    codes = torch.stack(torch.broadcast_tensors(pool[None, :] % 3, rows[:, None]), dim=-1)  # (U, C, 2)
    return codes[:, :, None, :].to(torch.int16)


def _test_split() -> EncodedSamples:
    return _samples(
        ["a", "a", "b", "c", "d", "e"],
        [5, 3, 6, 2, 7, 8],
        [1, 0, 1, 1, 0, 1],  # eligible: rows 0, 2, 5 (row 3's item 2 is seen, row 4 is a negative)
        [[1, 2, 0], [1, 2, 0], [6, 1, 0], [5, 0, 0], [6, 0, 0], [0, 0, 0]],
        [2, 2, 2, 1, 1, 0],
    )


@pytest.mark.parametrize("batch_size", [1, 3, 5, 4096])
def test_unseen_item_recall_ranks_each_users_target_in_the_unseen_pool(batch_size):
    model = FixedScore().train()
    unseen = torch.tensor([8, 5, 0, 6, 7, 5])  # duplicates and PAD dropped: pool 5, 6, 7, 8
    out = unseen_item_recall(model, _test_split(), unseen, pool_stats, ns=(1, 2, 3, 4), batch_size=batch_size)
    # pool scores 5: 0.1, 6: 0.5, 7: 0.9, 8: 0.5
    # row 0 (target 5, history starts with 1): rank 4; row 2 (target 6 = first history item, +10): rank 1;
    # row 5 (target 8, empty history): 7 above, 6 ties above -> rank 3
    assert out["users"] == 3 and out["eligible"] == 3 and out["pool"] == 4
    assert out["recall"] == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 4: 1.0})
    assert sum(size for size, _, _ in model.calls) == 3 * 4
    assert all(size <= batch_size and not training and not grad for size, training, grad in model.calls)
    assert model.training  # the caller's mode is restored
    for items, stats in model.stats_seen:  # each pool item is scored with its own statistics
        assert torch.equal(stats[:, 0, 0], (items % 3).to(torch.int16))


def test_unseen_item_recall_caps_users_evenly_and_handles_no_unseen_positive():
    capped = unseen_item_recall(
        FixedScore(), _test_split(), torch.tensor([5, 6, 7, 8]), pool_stats, ns=(1, 3, 4), max_users=2
    )
    # eligible rows 0, 2, 5; the middles of 2 strata: 1 * 3 // 4 = 0, 3 * 3 // 4 = 2 -> rows 0, 5
    # (ranks 4 and 3)
    assert capped == {"users": 2, "eligible": 3, "pool": 4, "recall": {1: 0.0, 3: 0.5, 4: 1.0}}
    none = unseen_item_recall(FixedScore(), _test_split(), torch.tensor([4]), pool_stats)
    assert none == {"users": 0, "eligible": 0, "pool": 1, "recall": {}}
    empty = unseen_item_recall(FixedScore(), _test_split(), torch.tensor([], dtype=torch.long), pool_stats)
    assert empty == {"users": 0, "eligible": 0, "pool": 0, "recall": {}}
    with pytest.raises(ValueError, match="max_users"):
        unseen_item_recall(FixedScore(), _test_split(), torch.tensor([5]), pool_stats, max_users=0)
