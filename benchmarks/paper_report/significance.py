"""The significance tests of the paper's claims."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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


def paired_delta(arm: Mapping[int, float], reference: Mapping[int, float]) -> dict[str, Any]:
    """Seed -> test AUC of two arms -> the mean per-seed delta over the seeds both ran, with a 95% t
    interval (NaN below two seeds); a gain (or loss) only when the interval excludes 0."""
    import numpy as np
    from scipy import stats

    seeds = sorted(set(arm) & set(reference))
    deltas = np.array([arm[s] - reference[s] for s in seeds])
    mean = float(deltas.mean()) if len(deltas) else float("nan")
    if len(deltas) >= 2:
        half = float(stats.t.ppf(1 - ALPHA / 2, len(deltas) - 1) * deltas.std(ddof=1) / np.sqrt(len(deltas)))
    else:
        half = float("nan")
    low, high = mean - half, mean + half
    return {
        "seeds": seeds,
        "deltas": deltas.tolist(),
        "mean": mean,
        "ci95": [low, high],
        "gain": bool(low > 0),  # NaN compares False: no interval, no claim
        "loss": bool(high < 0),
    }


def comparison_table(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows of :func:`paired_delta` results (each with its ``arm`` and ``reference``)."""
    lines = ["| arm - reference | seeds | mean delta AUC | 95% interval | verdict |", "|---|---|---|---|---|"]
    for c in comparisons:
        verdict = "gain" if c["gain"] else "loss" if c["loss"] else "no difference shown"
        low, high = c["ci95"]
        lines.append(
            f"| {c['arm']} - {c['reference']} | {len(c['seeds'])} | {c['mean']:+.4f} | "
            f"[{low:+.4f}, {high:+.4f}] | {verdict} |"
        )
    return lines
