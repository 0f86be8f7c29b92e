"""CTR metrics: AUC, per-user AUC (paper Eq. 11) and logloss."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Global ROC AUC; NaN when only one class is present (undefined, not 0.5)."""
    labels = np.asarray(labels)
    if labels.min(initial=1) == labels.max(initial=0):
        return float("nan")
    return float(roc_auc_score(labels, scores))


def user_auc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Paper Eq. 11: the unweighted mean over users having both classes of each user's own AUC.

    Ties count one half (Mann-Whitney); Eq. 11's strict ``>`` would score a constant predictor 0,
    not 0.5. Users with a single class have no AUC and are left out, as the equation requires.
    """
    frame = pd.DataFrame(
        {"user": np.asarray(users), "label": np.asarray(labels), "score": np.asarray(scores)}
    )
    frame["rank"] = frame.groupby("user")["score"].rank(method="average")
    frame["pos_rank"] = frame["rank"].where(frame["label"] == 1, 0.0)
    per_user = frame.groupby("user").agg(
        n=("label", "size"), n_pos=("label", "sum"), pos_rank=("pos_rank", "sum")
    )
    n_neg = per_user["n"] - per_user["n_pos"]
    both = (per_user["n_pos"] > 0) & (n_neg > 0)
    if not both.any():
        return float("nan")
    p, n, r = per_user.loc[both, "n_pos"], n_neg[both], per_user.loc[both, "pos_rank"]
    return float(((r - p * (p + 1) / 2) / (p * n)).mean())


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]))


def ctr_metrics(users: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """The metrics every run reports (metrics.json)."""
    return {
        "auc": auc(labels, probabilities),
        "user_auc": user_auc(users, labels, probabilities),
        "logloss": logloss(labels, probabilities),
        "samples": len(labels),
        "positive_rate": float(np.mean(labels)),
    }
