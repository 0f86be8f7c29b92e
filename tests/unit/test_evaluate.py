"""Metrics against hand-computed values."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from marn.evaluate import auc, ctr_metrics, logloss, user_auc


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
