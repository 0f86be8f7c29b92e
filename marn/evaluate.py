"""CTR metrics: AUC, per-user AUC (paper Eq. 11) and logloss; the paper's item analyses of section 4.6:
AUC by item-popularity level (Table 4) and the recall@N of items unseen in training (Table 5).

torch is imported only inside the model-driven function, so the metrics stay usable without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from numbers import Integral
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

if TYPE_CHECKING:
    import torch

    from marn.data.tensors import EncodedSamples
    from marn.models.base import CTRModel


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


def training_item_counts(train: EncodedSamples, n_items: int, histories: bool = True) -> np.ndarray:
    """(n_items,) int64: how often each item code occurs in the training split, as the model saw it.

    Counted: the candidate of every training positive (label 1; sampled negatives are no interactions),
    plus, with ``histories``, every history entry within ``hist_len`` of every training sample, positive
    or negative (padding is not counted; a PAD-coded entry inside ``hist_len``, an item the vocabulary
    lacks, counts for code 0). A behaviour is thus counted once per training sample whose history shows
    it: under the DIN protocol a user's early behaviours recur in many later samples' histories (at most
    ``max_history``), and each negative repeats its positive's history. The count is an exposure count,
    not a number of distinct events; it is zero exactly when the item never reached the model in
    training, which is what "unseen" means. ``histories=False`` counts the positives' candidates only:
    each training event once except every user's first behaviour (never a target), closer to the paper's
    "frequencies of interactions" but no test of unseen-ness. ``n_items`` is the vocabulary size with
    PAD: ``len(catalog.items)``.
    """
    if n_items < 1:
        raise ValueError(f"n_items must be at least 1, got {n_items}")
    tensors = train.tensors
    label, item = tensors["label"].numpy(), tensors["item"].numpy()
    codes = [item[label == 1]]
    if histories:
        hist = tensors["hist_items"].numpy()  # (N, L)
        inside = np.arange(hist.shape[1]) < tensors["hist_len"].numpy()[:, None]  # (N, L)
        codes.append(hist[inside])
    flat = np.concatenate(codes).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_items):
        raise ValueError(f"item codes span {flat.min()}..{flat.max()}, outside 0..{n_items - 1} (n_items)")
    return np.bincount(flat, minlength=n_items)


def auc_by_popularity(
    items: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    item_counts: Mapping[int, int] | pd.Series | np.ndarray,
    levels: int = 10,
) -> list[dict[str, Any]]:
    """Paper 4.6.1 / Table 4: the AUC of the test samples at each of ``levels`` item-popularity levels.

    The distinct test items are ordered by their count in ``item_counts`` (interactions in the TRAINING
    log, e.g. :func:`training_item_counts`; never the test events: an item missing from a mapping or
    Series counts 0) and cut into ``levels`` equal-frequency groups of items, level 0 the least popular.
    Each sample goes to its item's level; each level's AUC is the global AUC of its samples.

    Ties: the items are ordered by (count, item code). The cut before level k sits at the equal-frequency
    position floor(k * D / levels) of the D distinct items; when that splits a group of equal counts, the
    cut moves to the group's nearer edge (the lower one on a draw, else the other) if the edge is at most
    half a level (D / 2 levels) away and every level keeps an item. Otherwise the group stays split there,
    lower item codes in the lower level: a group that large (long tails of rare items) cannot fit one
    level without breaking the equal frequency the paper asks for. With fewer distinct items than levels
    some levels are empty.

    Returns one dict per level: level, auc (None when the level lacks a class or is empty), samples,
    items (distinct), min_count and max_count of its items (None when empty).
    """
    items, labels, scores = np.asarray(items), np.asarray(labels), np.asarray(scores)
    if not (items.ndim == labels.ndim == scores.ndim == 1):
        raise ValueError(
            f"items, labels, scores must be 1-D, got {items.shape}, {labels.shape}, {scores.shape}"
        )
    if not len(items) == len(labels) == len(scores):
        raise ValueError(f"lengths differ: items {len(items)}, labels {len(labels)}, scores {len(scores)}")
    if isinstance(levels, bool) or not isinstance(levels, Integral) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    distinct, item_index = np.unique(items, return_inverse=True)  # (D,), (N,)
    counts = _lookup_counts(item_counts, distinct)  # (D,)
    order = np.lexsort((distinct, counts))  # by count, then item code
    sorted_counts = counts[order]
    cuts = _level_cuts(sorted_counts, int(levels))  # (levels - 1,)
    item_level = np.empty(len(distinct), dtype=np.int64)
    item_level[order] = np.searchsorted(cuts, np.arange(len(distinct)), side="right")
    sample_level = item_level[item_index]  # (N,)
    bounds = np.r_[0, cuts, len(distinct)]
    out = []
    for level in range(int(levels)):
        lo, hi = bounds[level], bounds[level + 1]
        mask = sample_level == level
        level_auc = auc(labels[mask], scores[mask]) if mask.any() else float("nan")
        out.append(
            {
                "level": level,
                "auc": None if np.isnan(level_auc) else level_auc,
                "samples": int(mask.sum()),
                "items": int(hi - lo),
                "min_count": sorted_counts[lo].item() if hi > lo else None,
                "max_count": sorted_counts[hi - 1].item() if hi > lo else None,
            }
        )
    return out


def recall_at_n(scores: np.ndarray, targets: np.ndarray, ns: Iterable[int]) -> dict[int, float]:
    """Share of users whose target ranks in their top N, for each N in ``ns`` (paper 4.6.2 / Table 5).

    scores (U, C): each user's scores over a pool of C candidate items; targets (U,): the column of the
    user's clicked item. Ties are pessimistic: an item scoring the same as the target ranks above it, so
    a constant scorer gets no credit. U = 0 gives NaN (undefined, not 0).
    """
    scores, targets = np.asarray(scores), np.asarray(targets)
    ns = _check_ns(ns)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (users, pool), got shape {scores.shape}")
    n_users, pool = scores.shape
    if targets.shape != (n_users,):
        raise ValueError(f"targets must be ({n_users},), one per user, got shape {targets.shape}")
    if n_users == 0:
        return {n: float("nan") for n in ns}
    if not np.issubdtype(targets.dtype, np.integer) or targets.min() < 0 or targets.max() >= pool:
        raise ValueError(
            f"targets must be integer columns in 0..{pool - 1}, got {targets.min()}..{targets.max()}"
        )
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN: ranks are undefined")
    target_scores = scores[np.arange(n_users), targets]  # (U,)
    ranks = (scores >= target_scores[:, None]).sum(axis=1)  # (U,) 1 = top; the target counts itself
    return {n: float(np.mean(ranks <= n)) for n in ns}


def unseen_item_recall(
    model: CTRModel,
    test: EncodedSamples,
    unseen_items: torch.Tensor,
    pool_stats: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ns: Iterable[int] = (10, 20, 50, 100),
    max_users: int = 1000,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Paper 4.6.2 / Table 5: click recall@N among items unseen in training.

    The pool is the distinct codes of ``unseen_items`` (items with no interaction in the training log,
    e.g. the test candidates whose :func:`training_item_counts` is 0), PAD left out: it stands for every
    item the vocabulary lacks, not one item. The users are the test positives whose candidate is in the
    pool (one per user under the DIN protocol), at most ``max_users`` of them, spread over the test order
    (the middle one of each of ``max_users`` equal strata). Each user's history is scored against every
    pool item; the rank of the clicked one gives :func:`recall_at_n`. The paper ranks a next-day candidate
    set of new items; here the pool stands in for it. ``pool_stats(rows (U,), pool (C,))`` gives each pool
    item's statistic codes (U, C, F, G) as of each user's test time, so a pool item is scored with its own
    point-in-time statistics, as the clicked one is.

    Cost: users x pool forward passes, in batches of ``batch_size`` (user, item) pairs; memory holds the
    (users, pool) float32 scores plus one batch. Returns {"users": U, "eligible": positives before the
    cap, "pool": C, "recall": {N: value}}; users 0 and recall {} when no test positive is unseen.
    """
    import torch

    from marn.data.tensors import PAD

    ns = _check_ns(ns)
    if max_users < 1:
        raise ValueError(f"max_users must be at least 1, got {max_users}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pool = torch.unique(torch.as_tensor(unseen_items, dtype=torch.long).flatten())  # (C,) sorted
    pool = pool[pool != PAD]
    n_pool = len(pool)
    items, labels = test.tensors["item"], test.tensors["label"]
    eligible = torch.nonzero((labels == 1) & torch.isin(items, pool)).flatten()
    n_eligible = len(eligible)
    n_users = min(n_eligible, max_users)
    if n_users == 0:
        return {"users": 0, "eligible": 0, "pool": n_pool, "recall": {}}
    # (U,) the middle row of each of U equal strata of the eligible rows: spread over the whole test order
    rows = eligible[(2 * torch.arange(n_users) + 1) * n_eligible // (2 * n_users)]
    targets = torch.searchsorted(pool, items[rows])  # (U,) columns in the sorted pool
    stats = pool_stats(rows, pool).flatten(0, 1)  # (U * C, F, G) row-major as the pairs
    scores = torch.empty(n_users * n_pool)  # (U * C,) row-major: pair p = user p // C, item p % C
    first = next(chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n_users * n_pool, batch_size):
                pair = torch.arange(start, min(start + batch_size, n_users * n_pool))  # (B,)
                batch = test.batch(rows[pair // n_pool])  # the user's history, repeated per pool item
                batch["item"] = pool[pair % n_pool]
                batch["item_stats"] = stats[pair]
                batch = {name: t.to(device) for name, t in batch.items()}
                scores[start : start + len(pair)] = model(batch).logits.float().cpu()  # no sigmoid: ranks
    finally:
        model.train(was_training)
    recall = recall_at_n(scores.view(n_users, n_pool).numpy(), targets.numpy(), ns)
    return {"users": n_users, "eligible": n_eligible, "pool": n_pool, "recall": recall}


def _check_ns(ns: Iterable[int]) -> list[int]:
    ns = list(ns)
    if not ns or any(isinstance(n, bool) or not isinstance(n, Integral) or n < 1 for n in ns):
        raise ValueError(f"ns must be a non-empty list of integers >= 1, got {ns!r}")
    return [int(n) for n in ns]


def _lookup_counts(item_counts: Mapping[int, int] | pd.Series | np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(D,) training counts of ``codes``; items missing from a mapping or Series count 0."""
    if isinstance(item_counts, pd.Series):
        return item_counts.reindex(codes, fill_value=0).to_numpy()
    if isinstance(item_counts, Mapping):
        return np.array([item_counts.get(code, 0) for code in codes.tolist()])
    table = np.asarray(item_counts)
    if table.ndim != 1:
        raise ValueError(f"item_counts must be 1-D (one count per item code), got shape {table.shape}")
    if len(codes) and (
        not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= len(table)
    ):
        raise ValueError(
            f"item codes {codes.min()}..{codes.max()} fall outside item_counts (0..{len(table) - 1})"
        )
    return table[codes]


def _level_cuts(sorted_counts: np.ndarray, levels: int) -> np.ndarray:
    """(levels - 1,) positions in ``sorted_counts`` where each level after the first starts.

    Equal-frequency cuts, each moved to the nearer edge of a tie group it splits when the edge is within
    half a level and after the previous cut; see :func:`auc_by_popularity`. No level empties when there
    are at least as many items as levels: a cut moves up by at most D / 2 levels, less than the floor(D /
    levels) >= 1 to the next equal-frequency cut (with D < 2 levels, half a level is below 1: no moves).
    """
    d = len(sorted_counts)
    ideal = np.arange(1, levels) * d // levels
    edges = np.r_[0, np.flatnonzero(np.diff(sorted_counts)) + 1, d]  # where each tie group starts, and d
    half = d / (2 * levels)
    cuts, previous = [], 0
    for cut in ideal.tolist():
        above = int(np.searchsorted(edges, cut))  # edges[above - 1] < cut <= edges[above]
        if edges[above] != cut:  # inside a tie group
            below_edge, above_edge = int(edges[above - 1]), int(edges[above])
            for edge in sorted((below_edge, above_edge), key=lambda e: (abs(e - cut), e)):
                if abs(edge - cut) <= half and edge > previous:
                    cut = edge
                    break
        cuts.append(cut)
        previous = cut
    return np.asarray(cuts, dtype=np.int64)
