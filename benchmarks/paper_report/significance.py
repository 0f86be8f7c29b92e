"""The significance tests of the paper's claims."""

from __future__ import annotations

import math
from collections.abc import Sequence

ALPHA = 0.05


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's t-test of mean(a) > mean(b): t, two-sided p and the one-sided p of the paper's claim."""
    from scipy import stats

    t, p_two = stats.ttest_ind(a, b, equal_var=False)
    p_one = p_two / 2 if t > 0 else 1 - p_two / 2
    return {"t": float(t), "p_two_sided": float(p_two), "p_one_sided": float(p_one)}


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the sampling standard error of an AUC measured on this many samples."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
    return math.sqrt(var / (positives * negatives))
