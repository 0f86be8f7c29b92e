"""The paper reproduction's report: tables, figures and the results JSON from ``benchmarks/paper.py run``.

Reads only what the runs wrote (``WORK/runs``, ``WORK/cold``, ``WORK/tune``) and the trained MARN of seed 1
for the representation figures; trains nothing. Writes, into ``OUT``:

- ``paper-movielens.json``: ``{"models": {NAME: {"auc": [...], "user_auc": [...]}}, "command", "commit",
  "hardware", "wall_s", ...}`` plus the references, the ablation, popularity and held-out-item tables;
- ``paper-movielens.md``: Tables 2-5 analogues, the paper's claims checked one by one, the figures;
- ``paper-movielens/*.png``: Figures 4-6 analogues.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from marn.config import load_config
from marn.data.schema import Dataset, read_dataset
from marn.data.stats import earliest_time, item_stat_table
from marn.data.tensors import stat_codes
from marn.train import METRICS, load_trained

# popularity (the candidate's point-in-time statistics alone) is not in the paper: the floor every row of
# Table 2 is read against
TABLE2 = (
    "popularity",
    "lr",
    "fm",
    "youtubenet",
    "xdeepfm",
    "dupn",
    "din",
    "dien",
    "dmf",
    "mmss",
    "naml",
    "marn",
)
TABLE3 = ("base_ids", "base_image", "base_conc", "base_maf", "base_maf_adv", "base_maf_ddma", "marn")
REFERENCES = ("deepctr_din", "deepctr_dien")  # DeepCTR-Torch's, beside ours (deepctr_models.py)
# MARN with one of its adversary's ModelConfig switches flipped from the faithful default (issue 16): row ->
# (the registered model it trains, the fields it changes). benchmarks/paper.py trains them beside the tables.
SWITCH_ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "marn_w_raw": ("marn", {"d1_weights": "raw"}),
    "marn_reversal_into_e": ("marn", {"reversal_reaches": "embedding"}),
    "marn_before_issue16": ("marn", {"d1_weights": "raw", "reversal_reaches": "embedding"}),
    "marn_pool_per_item": ("marn", {"pool_weights": "per_item"}),
    "marn_lambda_grl": ("marn", {"lambda_role": "reversal"}),
}
LABELS = {
    "popularity": "Popularity (statistics only)",
    "lr": "LR",
    "fm": "FM",
    "youtubenet": "YoutubeNet",
    "xdeepfm": "xDeepFM",
    "dupn": "DUPN",
    "din": "DIN",
    "dien": "DIEN",
    "dmf": "DMF",
    "mmss": "MMSS",
    "naml": "NAML",
    "marn": "MARN",
    "base_ids": "BaseModel+IDs",
    "base_image": "BaseModel+IMAGE",
    "base_conc": "BaseModel+CONC",
    "base_maf": "BaseModel+MAF",
    "base_maf_adv": "BaseModel+MAF+ADV",
    "base_maf_ddma": "BaseModel+MAF+DDMA",
    "deepctr_din": "DeepCTR-Torch DIN",
    "deepctr_dien": "DeepCTR-Torch DIEN",
    "marn_w_raw": "MARN, raw w in D1's loss",
    "marn_reversal_into_e": "MARN, reversal on into e^m",
    "marn_before_issue16": "MARN, raw w and reversal into e^m (before issue 16)",
    "marn_pool_per_item": "MARN, max-pool w per item (M w / sum w)",
    "marn_lambda_grl": "MARN, lambda as the GRL coefficient",
}
# The adversary's per-epoch instrumentation in metrics.json (marn.models.marn.MARN.adversarial_diagnostics);
# the w columns are per modality (w_raw_ids, ...). Runs from before it have none of them.
INSTRUMENTS = ("d1_ce", "d1_acc", "d0_acc", "ds_acc")
WEIGHT_KINDS = ("w_raw", "w_norm", "w_pool")
# The paper's numbers (Amazon Electro., Clothe., Taobao AUC), for the side-by-side columns.
PAPER_AUC = {
    "lr": (0.7272, 0.7143, 0.7011),
    "fm": (0.7369, 0.7224, 0.7091),
    "youtubenet": (0.7675, 0.7593, 0.7241),
    "xdeepfm": (0.7762, 0.7691, 0.7287),
    "dupn": (0.7904, 0.7774, 0.7348),
    "dien": (0.7923, 0.7793, 0.7363),
    "dmf": (0.7924, 0.7797, 0.7371),
    "mmss": (0.7934, 0.7806, 0.7380),
    "naml": (0.7958, 0.7825, 0.7398),
    "marn": (0.8034, 0.7909, 0.7486),
    "base_ids": (0.7897, 0.7729, 0.7295),
    "base_image": (0.7631, 0.7564, 0.6833),
    "base_conc": (0.7929, 0.7792, 0.7360),
    "base_maf": (0.7961, 0.7827, 0.7399),
    "base_maf_adv": (0.7974, 0.7838, 0.7411),
    "base_maf_ddma": (0.8013, 0.7889, 0.7463),
}
GROUP2 = ("youtubenet", "xdeepfm", "dupn", "din", "dien")  # concatenation-based (paper 4.4)
GROUP3 = ("dmf", "mmss", "naml")  # multimodal item learning
ALPHA = 0.05
RESULTS = "paper-movielens"


@dataclass(frozen=True)
class Summary:
    name: str
    auc: list[float]
    user_auc: list[float]
    epochs: list[int]
    wall_s: list[float]
    best_epochs: list[int]  # the validation-chosen epoch of each seed
    valid_curves: list[list[float]]  # validation AUC after each epoch, per seed
    best_rows: list[dict[str, Any]] = field(default_factory=list)  # each seed's history row of its best epoch

    @property
    def mean(self) -> float:
        return float(np.mean(self.auc))

    @property
    def std(self) -> float:
        return float(np.std(self.auc, ddof=1)) if len(self.auc) > 1 else float("nan")


def read_runs(root: Path, names: Sequence[str], seeds: int) -> dict[str, Summary]:
    """Each model's metrics over seeds 1..``seeds``; a model with no finished run is left out."""
    out = {}
    for name in names:
        metrics = [
            json.loads(p.read_text())
            for seed in range(1, seeds + 1)
            if (p := root / name / f"seed-{seed}" / METRICS).exists()
        ]
        if metrics:
            out[name] = Summary(
                name,
                [m["auc"] for m in metrics],
                [m["user_auc"] for m in metrics],
                [m["epochs_run"] for m in metrics],
                [m["wall_s"] for m in metrics],
                [m["best_epoch"] for m in metrics],
                [[h["valid_auc"] for h in m["history"]] for m in metrics],
                [next(h for h in m["history"] if h["epoch"] == m["best_epoch"]) for m in metrics],
            )
    return out


def stopped_early(s: Summary, patience: int) -> list[bool]:
    """Per seed: whether early stopping ended the run (``patience`` epochs without a gain after the best),
    not the epoch cap."""
    return [run - best >= patience for run, best in zip(s.epochs, s.best_epochs, strict=True)]


def instrumentation(s: Summary) -> dict[str, list[float]]:
    """The adversary's instrumentation at each seed's best epoch: {column: [one value per seed]}; {} for a
    model without it (no adversary, or a run from before it was logged)."""
    columns = (
        [k for k in s.best_rows[0] if k in INSTRUMENTS or k.startswith(WEIGHT_KINDS)] if s.best_rows else []
    )
    return {k: [row[k] for row in s.best_rows] for k in columns if all(k in row for row in s.best_rows)}


def instrumentation_table(runs: dict[str, Summary], names: Sequence[str]) -> str:
    """D1's unweighted cross-entropy and accuracy, D0's and Ds' accuracy and the normalised mean w per
    modality at the best epoch (mean over seeds), for the rows that logged them; "" when none did."""
    logged = {n: instrumentation(runs[n]) for n in names if n in runs}
    logged = {n: cols for n, cols in logged.items() if cols}
    if not logged:
        return ""
    weights = list(dict.fromkeys(k for cols in logged.values() for k in cols if k.startswith("w_norm_")))
    header = ["model", "D1 CE (unweighted)", "D1 acc", "D0 acc", "Ds acc"]
    header += [f"mean w/batch mean, {k.removeprefix('w_norm_')}" for k in weights]
    rows = [
        [LABELS[n], *[f"{np.mean(cols[k]):.3f}" if k in cols else "" for k in (*INSTRUMENTS, *weights)]]
        for n, cols in logged.items()
    ]
    return _table(header, rows)


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


def _fmt(values: Sequence[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def _fmt_percent(values: Sequence[float]) -> str:
    spread = f" ± {100 * np.std(values, ddof=1):.1f}" if len(values) > 1 else ""
    return f"{100 * np.mean(values):.1f}%{spread}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_table(runs: dict[str, Summary], names: Sequence[str], paper: bool = True) -> str:
    header = ["model", "test AUC", "user AUC", "seeds", "epochs run", "best epoch", "s / run"]
    header += ["paper AUC (Electro. / Clothe. / Taobao)"] if paper else []
    rows = []
    for name in names:
        if name not in runs:
            rows.append([LABELS[name], "not run", *[""] * (len(header) - 2)])
            continue
        s = runs[name]
        paper_cols = [" / ".join(f"{v:.4f}" for v in PAPER_AUC[name])] if paper and name in PAPER_AUC else []
        rows.append(
            [
                LABELS[name],
                _fmt(s.auc),
                _fmt(s.user_auc),
                len(s.auc),
                f"{np.mean(s.epochs):.1f}",
                f"{np.mean(s.best_epochs):.1f}",
                f"{np.mean(s.wall_s):.0f}",
                *(paper_cols or ([""] if paper else [])),
            ]
        )
    return _table(header, rows)


# --------------------------------------------------------------------------------------------------------
# The paper's claims, checked on these runs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    text: str  # what the paper says
    here: str  # what the numbers here say
    holds: bool | None  # None: cannot be checked (missing runs)


def _beats(runs: dict[str, Summary], a: str, b: str, text: str) -> Claim:
    if a not in runs or b not in runs:
        return Claim(text, "not run", None)
    test = welch(runs[a].auc, runs[b].auc)
    diff = runs[a].mean - runs[b].mean
    here = (
        f"{LABELS[a]} {runs[a].mean:.4f} vs {LABELS[b]} {runs[b].mean:.4f} ({diff:+.4f}; Welch t "
        f"{test['t']:.2f}, one-sided p {test['p_one_sided']:.3f})"
    )
    return Claim(text, here, bool(diff > 0 and test["p_one_sided"] < ALPHA))


def table_claims(runs: dict[str, Summary]) -> list[Claim]:
    claims = []
    others = [n for n in TABLE2 + TABLE3 if n != "marn" and n in runs]
    if "marn" in runs and others:
        best = max(others, key=lambda n: runs[n].mean)
        claims.append(_beats(runs, "marn", best, "MARN beats the best other model significantly (Table 2)"))
    neural = [n for n in TABLE2 if n not in ("popularity", "lr", "fm") and n in runs]
    if {"lr", "fm"} <= runs.keys() and neural:
        worst = min(neural, key=lambda n: runs[n].mean)
        linear = max(runs["lr"].mean, runs["fm"].mean)
        claims.append(
            Claim(
                "Neural models beat LR and FM (group 1)",
                f"weakest neural {LABELS[worst]} {runs[worst].mean:.4f} vs best of LR/FM {linear:.4f}",
                runs[worst].mean > linear,
            )
        )
    g2, g3 = [n for n in GROUP2 if n in runs], [n for n in GROUP3 if n in runs]
    if g2 and g3:
        best2, worst3 = max(g2, key=lambda n: runs[n].mean), min(g3, key=lambda n: runs[n].mean)
        claims.append(
            Claim(
                "Multimodal item models (DMF, MMSS, NAML) beat every concatenation model (group 2)",
                f"weakest of group 3 {LABELS[worst3]} {runs[worst3].mean:.4f} vs best of group 2 "
                f"{LABELS[best2]} {runs[best2].mean:.4f}",
                runs[worst3].mean > runs[best2].mean,
            )
        )
    for a, b, text in (
        ("base_conc", "base_ids", "CONC beats the unimodal BaseModel+IDs (Table 3)"),
        ("base_conc", "base_image", "CONC beats the unimodal BaseModel+IMAGE"),
        ("base_ids", "base_image", "IDs beat IMAGE alone"),
        ("base_maf", "base_conc", "MAF beats CONC"),
        ("base_maf_adv", "base_maf", "ADV improves on MAF"),
        ("base_maf_ddma", "base_maf", "DDMA improves on MAF"),
        ("base_maf_ddma", "base_maf_adv", "DDMA beats ADV"),
        ("marn", "base_maf_ddma", "APGRU improves on BaseModel+MAF+DDMA (= MARN)"),
    ):
        claims.append(_beats(runs, a, b, text))
    return claims


# --------------------------------------------------------------------------------------------------------
# Table 4 and Table 5 analogues
# --------------------------------------------------------------------------------------------------------


def _seed_metrics(root: Path, name: str, seeds: int) -> list[dict[str, Any]]:
    paths = [root / name / f"seed-{s}" / METRICS for s in range(1, seeds + 1)]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def popularity_table(work: Path, seeds: int) -> dict[str, Any] | None:
    """AUC per item-popularity level, averaged over seeds, for BaseModel+IDs and MARN (Table 4)."""
    per_model = {}
    for name in ("base_ids", "marn"):
        metrics = _seed_metrics(work / "runs", name, seeds)
        if not metrics:
            return None
        levels = metrics[0]["auc_by_popularity"]
        per_model[name] = [
            [
                m["auc_by_popularity"][k]["auc"]
                for m in metrics
                if m["auc_by_popularity"][k]["auc"] is not None
            ]
            for k in range(len(levels))
        ]
        per_model["levels"] = levels  # sample and count ranges are the same for every model and seed
    return per_model


def popularity_markdown(table: dict[str, Any]) -> tuple[str, list[Claim]]:
    levels = table["levels"]
    ids = [float(np.mean(v)) if v else math.nan for v in table["base_ids"]]
    marn = [float(np.mean(v)) if v else math.nan for v in table["marn"]]
    header = ["popularity level", *[str(level["level"]) for level in levels]]
    rows = [
        ["training clicks per item", *[f"{lv['min_count']}-{lv['max_count']}" for lv in levels]],
        ["test samples", *[str(lv["samples"]) for lv in levels]],
        ["BaseModel+IDs", *[f"{v:.3f}" for v in ids]],
        ["MARN", *[f"{v:.3f}" for v in marn]],
        ["GAP", *[f"{100 * (m - i):+.1f}%" for m, i in zip(marn, ids, strict=True)]],
    ]
    gaps = np.array(marn) - np.array(ids)
    low, high = float(np.nanmean(gaps[:4])), float(np.nanmean(gaps[-3:]))
    claim = Claim(
        "MARN's gain over BaseModel+IDs is largest on unpopular items (Table 4: levels 0-3 vs 7-9)",
        f"mean gap {100 * low:+.1f} points on levels 0-3, {100 * high:+.1f} on levels 7-9",
        bool(low > high and low > 0),
    )
    return _table(header, rows), [claim]


def cold_table(work: Path, seeds: int) -> dict[str, Any] | None:
    """Recall@N among held-out items for BaseModel+IDs and MARN, per seed (Table 5)."""
    out: dict[str, Any] = {}
    for name in ("base_ids", "marn"):
        metrics = _seed_metrics(work / "cold", name, seeds)
        if not metrics:
            return None
        recalls = [m["unseen_recall"] for m in metrics]
        out[name] = {
            "users": recalls[0]["users"],
            "pool": recalls[0]["pool"],
            "auc": [m["auc"] for m in metrics],
            "recall": {n: [r["recall"][n] for r in recalls] for n in recalls[0]["recall"]},
        }
    held = work / "cold" / "held_out.json"
    out["held_out"] = json.loads(held.read_text()) if held.exists() else None
    return out


def cold_markdown(table: dict[str, Any]) -> tuple[str, list[Claim]]:
    ns = list(table["marn"]["recall"])
    pool = table["marn"]["pool"]
    rows = [["RANDOM (expected)", *[f"{100 * min(int(n), pool) / pool:.1f}%" for n in ns], ""]]
    for name in ("base_ids", "marn"):
        r = table[name]
        rows.append(
            [
                LABELS[name],
                *[_fmt_percent(r["recall"][n]) for n in ns],
                _fmt(r["auc"]),
            ]
        )
    header = ["model", *[f"recall@{n}" for n in ns], "test AUC (all items)"]
    wins = [np.mean(table["marn"]["recall"][n]) > np.mean(table["base_ids"]["recall"][n]) for n in ns]
    claim = Claim(
        "MARN recalls more unseen items than BaseModel+IDs at every N (Table 5)",
        f"MARN ahead at {sum(wins)} of {len(ns)} cut-offs ({table['marn']['users']} users, pool of "
        f"{pool} held-out items)",
        all(wins),
    )
    return _table(header, rows), [claim]


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def item_parts(model_path: Path, dataset: Dataset):
    """MARN's decomposition of every real item, each with its statistics after the last event (the state
    serving would see): (item ids, modality names, ItemParts)."""
    import torch

    from marn.models.layers import ItemStates

    trained = load_trained(model_path)
    model = trained.model
    ids = list(trained.catalog.items.values)  # item code k is ids[k - 1]; 0 is PAD
    table = item_stat_table(dataset, earliest_time(dataset))
    after_all = np.full(len(ids), (table["ts"].max() + pd.Timedelta(microseconds=1)).to_datetime64())
    stats = stat_codes(table, np.asarray(ids, dtype=object), after_all, trained.statistics)
    with torch.no_grad():
        parts = model.decompose(ItemStates(torch.arange(1, len(ids) + 1), torch.from_numpy(stats)))
    return trained, ids, list(model.embedding.modalities), parts


def attention_by_genre(
    parts, modalities: list[str], genres_of_item: list[list[str]]
) -> tuple[list[str], np.ndarray]:
    """(G,) genres and (G, M) mean share of each modality in the fused vector s = sum_m atten^m * s^m.

    An item's share of modality m is |atten^m * s^m|_1 / sum_k |atten^k * s^k|_1: how much of s it gives.
    """
    contribution = (parts.atten * parts.specific).abs().sum(-1).numpy()  # (U, M)
    share = contribution / np.maximum(contribution.sum(1, keepdims=True), 1e-12)
    genres = sorted({g for gs in genres_of_item for g in gs})
    matrix = np.stack([share[[g in gs for gs in genres_of_item]].mean(0) for g in genres])
    return genres, matrix


def figure_attention(
    path: Path, genres: list[str], modalities: list[str], matrix: np.ndarray, counts: list[int]
):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(genres) + 1.5))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(modalities)), modalities)
    ax.set_yticks(range(len(genres)), [f"{g} ({n})" for g, n in zip(genres, counts, strict=True)])
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(
                j,
                i,
                f"{matrix[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] < matrix.mean() else "black",
            )
    fig.colorbar(image, ax=ax, label="share of the fused vector s")
    ax.set_title("Modality attention by genre (MARN, seed 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_tsne(
    path: Path, parts, modalities: list[str], max_items: int = 400, seed: int = 0
) -> dict[str, float]:
    """Figure 5: t-SNE of the image and title features of the same items, modality-specific (s^m) and
    modality-invariant (c^m, before the max over modalities), as the paper plots them.

    Returns the mixing of image and title within each kind: the share of an image point's 10 nearest
    neighbours of its own kind (in the original space) that are title points, and vice versa. About 0.5
    means the two modalities overlap (the paper's picture for c^m), 0 that they are apart (for s^m).
    """
    from sklearn.manifold import TSNE
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(seed)
    n = parts.specific.shape[0]
    pick = np.sort(rng.choice(n, size=min(max_items, n), replace=False))
    image, title = modalities.index("image"), modalities.index("title")
    kinds = {"specific": parts.specific, "invariant": parts.invariant}
    mixing, embedded = {}, {}
    for kind, features in kinds.items():
        points = np.concatenate([features[pick, image].numpy(), features[pick, title].numpy()])
        is_title = np.repeat([False, True], len(pick))
        near = NearestNeighbors(n_neighbors=11).fit(points).kneighbors(points, return_distance=False)[:, 1:]
        mixing[kind] = float((is_title[near] != is_title[:, None]).mean())
        embedded[kind] = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(
            points
        )
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (kind, xy) in zip(axes, embedded.items(), strict=True):
        symbol = "s" if kind == "specific" else "c"
        for k, (name, color) in enumerate((("image", "tab:blue"), ("title", "tab:orange"))):
            part = xy[k * len(pick) : (k + 1) * len(pick)]
            ax.scatter(part[:, 0], part[:, 1], s=5, alpha=0.6, color=color, label=f"{symbol}^{name}")
        ax.set_title(f"modality-{kind} features: image/title mixing {mixing[kind]:.2f}")
        ax.legend(markerscale=3, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"t-SNE of {len(pick)} items' features (MARN seed 1); mixing 0.5 = overlap, 0 = apart")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return mixing


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def figure_losses(path: Path, curves: dict[str, Any]) -> dict[str, float]:
    """Per-step CTR and adversarial losses of MARN (Figure 6a), with the discriminators' accuracies and the
    normalised mean w per modality when the run logged them; returns the adversarial loss's trend.

    The paper's adversarial loss is D1's cross-entropy on c^m: ``d1_ce``, unweighted. Runs from before it
    was logged have only ``adv``, L_adv as trained (w-weighted), which is plotted and trended instead.
    """
    steps = curves["steps"]
    per_epoch = curves["steps_per_epoch"]
    names = [k for k in steps[0] if k != "step"]
    adversarial = "d1_ce" if "d1_ce" in names else "adv"
    panels = {
        "CTR loss": ["ctr"],
        "discriminator losses": [n for n in ("d1_ce", "adv", "d0", "ds") if n in names],
        "discriminator accuracy": [n for n in ("d1_acc", "d0_acc", "ds_acc") if n in names],
        "mean w per modality / batch mean": [n for n in names if n.startswith("w_norm_")],
    }
    panels = {title: keys for title, keys in panels.items() if keys}
    x = np.array([s["step"] for s in steps]) / per_epoch
    window = max(1, per_epoch // 10)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    labels = {
        "ctr": "CTR log loss",
        "d1_ce": "D1's cross-entropy on c^m, unweighted (Figure 6a)",
        "adv": "L_adv as trained (weighted, through the GRL)",
        "d0": "L_D0",
        "ds": "L_Ds",
        "d1_acc": "D1 on c^m",
        "d0_acc": "D0 on c^m",
        "ds_acc": "Ds on s^m",
    }
    for ax, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for name in keys:
            y = np.array([s[name] for s in steps])
            label = labels.get(name, name.removeprefix("w_norm_"))
            ax.plot(x[window - 1 :], _smooth(y, window), label=label, lw=2.5 if name == adversarial else 1.2)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("MARN training (seed 1; moving average over a tenth of an epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    adv = np.array([s[adversarial] for s in steps]) if adversarial in names else np.array([])
    if len(adv) < 10:
        return {}
    tenth = len(adv) // 10
    return {
        "loss": adversarial,
        "adv_first_tenth": float(adv[:tenth].mean()),
        "adv_last_tenth": float(adv[-tenth:].mean()),
    }


def read_tune_reports(work: Path) -> dict[str, dict[str, Any]]:
    """Each searched row's ``tune.json`` (``WORK/tune/ROW/``); a work dir from before the per-variant
    searches has one MARN search at ``WORK/tune/tune.json``."""
    reports = {p.parent.name: json.loads(p.read_text()) for p in sorted((work / "tune").glob("*/tune.json"))}
    legacy = work / "tune" / "tune.json"
    if not reports and legacy.exists():
        reports["marn"] = json.loads(legacy.read_text())
    return reports


def figure_lambda(path: Path, tune_reports: dict[str, dict[str, Any]]) -> None:
    """Figure 6b: best validation AUC against lambda0, one line per searched variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, report in tune_reports.items():
        trials = [t for t in report["trials"] if t["valid_auc"] is not None]
        lam = np.array([t["lambda0"] for t in trials])
        auc = np.array([t["valid_auc"] for t in trials])
        order = np.argsort(lam)
        best = report["best"]["lambda0"]
        (line,) = ax.plot(lam[order], auc[order], "o-", label=f"{LABELS.get(row, row)}: best {best:.3g}")
        ax.axvline(best, color=line.get_color(), ls="--", lw=0.8)
    ax.axvline(0.05, color="gray", ls=":", label="paper's best for MARN, 0.05")
    ax.set_xscale("log")
    ax.set_xlabel("lambda0")
    ax.set_ylabel("best validation AUC")
    trials = sum(len(r["trials"]) for r in tune_reports.values())
    ax.set_title(f"Validation AUC against lambda0 ({trials} Ray Tune trials)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_valid_curves(path: Path, runs: dict[str, Summary]) -> None:
    """Validation AUC after each epoch (mean over seeds): which models were still improving at the cap."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.cm.tab20(np.linspace(0, 1, 20))  # 17 lines: tab10 would repeat colours
    for k, (name, s) in enumerate(runs.items()):
        width = max(len(c) for c in s.valid_curves)
        means = [np.mean([c[k] for c in s.valid_curves if len(c) > k]) for k in range(width)]
        style = {"color": "tab:red", "lw": 2.5} if name == "marn" else {"lw": 1, "color": colors[k % 20]}
        ax.plot(range(1, width + 1), means, marker="o", ms=3, label=LABELS[name], **style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC (mean over seeds)")
    ax.set_xticks(range(1, max(len(c) for s in runs.values() for c in s.valid_curves) + 1))
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_auc(path: Path, runs: dict[str, Summary], references: dict[str, Summary]) -> None:
    """Every model's test AUC per seed, sorted by mean: the spread the t-tests work with."""
    everything = {**runs, **references}
    names = sorted(everything, key=lambda n: everything[n].mean)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    for i, name in enumerate(names):
        s = everything[name]
        color = "tab:red" if name == "marn" else ("tab:gray" if name in references else "tab:blue")
        ax.scatter(s.auc, [i] * len(s.auc), s=12, color=color, alpha=0.7)
        ax.plot([s.mean - s.std, s.mean + s.std], [i, i], color=color, lw=2)
    ax.set_yticks(range(len(names)), [LABELS[n] for n in names])
    ax.set_xlabel("test AUC (dots: seeds; bar: mean ± std)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------


def write_report(
    data: Path, work: Path, config: Path, out: Path, seeds: int, hardware: str, commit: str
) -> None:
    cfg = load_config(config)
    dataset = read_dataset(data)
    fig_dir = out / RESULTS
    fig_dir.mkdir(parents=True, exist_ok=True)
    runs = read_runs(work / "runs", list(dict.fromkeys(TABLE2 + TABLE3 + tuple(SWITCH_ROWS))), seeds)
    references = read_runs(work / "runs", REFERENCES, seeds)
    tune_reports = read_tune_reports(work)
    timing = json.loads((work / "timing.json").read_text()) if (work / "timing.json").exists() else {}
    path = work / "command.json"
    invocations = json.loads(path.read_text()).get("invocations", []) if path.exists() else []
    command = " && ".join(dict.fromkeys(i["command"] for i in invocations))
    report_commit = commit
    commit = invocations[0]["commit"] if invocations else commit  # the code the runs came from
    later = sorted({i["commit"][:10] for i in invocations} - {commit[:10]})
    claims = table_claims(runs)
    sections: list[str] = []
    figures: dict[str, str] = {}

    pop = popularity_table(work, seeds)
    pop_md = ""
    if pop:
        pop_md, pop_claims = popularity_markdown(pop)
        claims += pop_claims
    cold = cold_table(work, seeds)
    cold_md = ""
    if cold:
        cold_md, cold_claims = cold_markdown(cold)
        claims += cold_claims

    extras: dict[str, Any] = {}
    marn_dir = work / "runs" / "marn" / "seed-1"
    if (marn_dir / "model.pt").exists():
        _, ids, modalities, parts = item_parts(marn_dir / "model.pt", dataset)
        items = dataset.items.set_index("item_id").reindex(ids)
        genres_of_item = [str(c).split("|") for c in items["category_id"].fillna("unknown")]
        if parts.atten is not None:
            genres, matrix = attention_by_genre(parts, modalities, genres_of_item)
            counts = [sum(g in gs for gs in genres_of_item) for g in genres]
            figure_attention(fig_dir / "fig4-attention-by-genre.png", genres, modalities, matrix, counts)
            figures["fig4"] = f"{RESULTS}/fig4-attention-by-genre.png"
            extras["attention_by_genre"] = {
                "modalities": modalities,
                "genres": {
                    g: {m: round(float(v), 4) for m, v in zip(modalities, row, strict=True)}
                    for g, row in zip(genres, matrix, strict=True)
                },
            }
        if parts.invariant is not None:
            mixing = figure_tsne(fig_dir / "fig5-tsne.png", parts, modalities)
            figures["fig5"] = f"{RESULTS}/fig5-tsne.png"
            extras["tsne_image_title_mixing"] = mixing
            # DDMA's importance weights w^m = 1 - D0's probability of the true modality: raw ones near 0
            # mean D0 tells every c^m's modality apart. Over their mean (as D1's loss uses them), a modality
            # near 0 is one the adversary has given up on; about 1 each, all take part alike.
            w_raw = parts.w.mean(0)  # (M,)
            w_norm = (parts.w / parts.w.mean()).mean(0)  # (M,)
            extras["ddma_w_mean"] = {m: round(float(w), 4) for m, w in zip(modalities, w_norm, strict=True)}
            extras["ddma_w_mean_raw"] = {
                m: round(float(w), 4) for m, w in zip(modalities, w_raw, strict=True)
            }
            claims.append(
                Claim(
                    "Modality-invariant features of image and title overlap; modality-specific ones do not "
                    "(Figure 5)",
                    f"image/title nearest-neighbour mixing {mixing['invariant']:.2f} for c^m, "
                    f"{mixing['specific']:.2f} for s^m (0.5 = overlap, 0 = apart)",
                    mixing["invariant"] >= 0.25 and mixing["invariant"] > mixing["specific"],
                )
            )
    if (marn_dir / "curves.json").exists():
        trend = figure_losses(
            fig_dir / "fig6a-losses.png", json.loads((marn_dir / "curves.json").read_text())
        )
        figures["fig6a"] = f"{RESULTS}/fig6a-losses.png"
        extras["adversarial_loss_trend"] = trend
        if trend:
            what = "D1's unweighted cross-entropy" if trend["loss"] == "d1_ce" else "L_adv (w-weighted)"
            claims.append(
                Claim(
                    "The adversarial loss grows during training (Figure 6a)",
                    f"{what} mean {trend['adv_first_tenth']:.4f} over the first tenth of the steps, "
                    f"{trend['adv_last_tenth']:.4f} over the last",
                    trend["adv_last_tenth"] > trend["adv_first_tenth"],
                )
            )
    if tune_reports:
        figure_lambda(fig_dir / "fig6b-auc-vs-lambda0.png", tune_reports)
        figures["fig6b"] = f"{RESULTS}/fig6b-auc-vs-lambda0.png"
    if runs:
        figure_auc(fig_dir / "auc-by-model.png", runs, references)
        figures["auc"] = f"{RESULTS}/auc-by-model.png"
        figure_valid_curves(fig_dir / "valid-auc-by-epoch.png", runs)
        figures["curves"] = f"{RESULTS}/valid-auc-by-epoch.png"

    complete = [n for n in runs if len(runs[n].auc) == seeds]
    wall_s = float(sum(timing.values()))
    results = {
        "models": {
            n: {
                "auc": s.auc,
                "user_auc": s.user_auc,
                "epochs_run": s.epochs,
                "best_epoch": s.best_epochs,
                "stopped_early": stopped_early(s, cfg.train.patience),
                **({"adversary": adversary} if (adversary := instrumentation(s)) else {}),
            }
            for n, s in runs.items()
        },
        "references": {n: {"auc": s.auc, "user_auc": s.user_auc} for n, s in references.items()},
        "command": command,
        "commit": commit,  # the code of the first `run`; `invocations` lists every one
        "invocations": invocations,
        "report_commit": report_commit,
        "hardware": hardware,
        "wall_s": wall_s,
        "wall_s_by_stage": timing,
        "seeds": seeds,
        "complete_models": len(complete),
        "lambda0": tune_reports["marn"]["best"]["lambda0"] if "marn" in tune_reports else None,
        "lambda0_by_model": {row: r["best"]["lambda0"] for row, r in tune_reports.items()},
        "t_test": {c.text: c.here for c in claims[:1]},
        "claims": [{"claim": c.text, "here": c.here, "holds": c.holds} for c in claims],
        "popularity": pop,
        "cold": cold,
        **extras,
        "config": cfg.model_dump(mode="json"),
    }
    (out / f"{RESULTS}.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")

    sections.append(
        f"# MARN on MovieLens-100k: the paper's experiments\n\n"
        f"Generated by `benchmarks/paper_report.py` (commit `{report_commit[:10]}`) from the runs of "
        f"`{command}` at commit `{commit[:10]}`"
        + (f" (continued at {', '.join(later)})" if later else "")
        + f" on {hardware}. Grid wall time: {wall_s / 60:.0f} min "
        f"({', '.join(f'{k} {v / 60:.0f} min' for k, v in timing.items())}).\n"
    )
    test_users, typical = 0, 0.85
    if (marn_dir / METRICS).exists():
        marn_metrics = json.loads((marn_dir / METRICS).read_text())
        test_users, typical = marn_metrics["samples"]["test"] // 2, marn_metrics["auc"]
    sections.append(
        _setup_text(cfg, dataset, tune_reports, seeds, len(complete), len(runs), test_users, typical)
    )
    sections.append(
        "## The paper's claims on this data\n\n"
        + _table(
            ["paper's claim", "here", "holds?"],
            [[c.text, c.here, {True: "yes", False: "**no**", None: "n/a"}[c.holds]] for c in claims],
        )
    )
    reading = out / f"{RESULTS}-reading.md"
    if reading.exists():
        sections.append(reading.read_text().strip())
    sections.append(
        "## Table 2 analogue: all models\n\n"
        + model_table(runs, TABLE2)
        + (f"\n\n![test AUC by model]({figures['auc']})" if "auc" in figures else "")
    )
    sections.append("## Table 3 analogue: ablations\n\n" + model_table(runs, TABLE3))
    switches = ["marn", *SWITCH_ROWS]
    if any(n in runs for n in SWITCH_ROWS):
        sections.append(
            "## MARN's adversary, one switch at a time\n\nMARN as configured (the faithful reading: w over "
            "its batch mean in D1's loss, the reversed gradient stopped at I, the raw w in the max-pool, "
            "lambda weighting the discriminator losses) against MARN with one of those choices flipped.\n\n"
            + model_table(runs, switches, paper=False)
        )
    adversary = instrumentation_table(runs, [*TABLE3, *SWITCH_ROWS])
    if adversary:
        sections.append(
            "## The adversary at the best epoch\n\nTraining-batch means over the best epoch, mean over "
            "seeds: D1's cross-entropy on c^m without the w weights (the paper's adversarial loss; ln M "
            "= chance), the share of c^m (D1, D0) and s^m (Ds) whose modality the discriminator names, and "
            "each modality's mean w^m over the batch's mean w (1 each: all modalities weigh alike in D1's "
            f"loss; near 0: that modality has left the game).\n\n{adversary}"
        )
    if "curves" in figures:
        sections.append(
            "## Training budget: validation AUC per epoch\n\nEvery model gets the same epoch cap; a curve "
            "still rising at the last epoch means that model was stopped by the budget, not by early "
            f"stopping.\n\n![validation AUC per epoch]({figures['curves']})"
        )
    if references:
        ours = [n for n in ("base_ids", "din", "dien") if n in runs]
        sections.append(
            "## Outside references: DeepCTR-Torch on the same split\n\n"
            "DeepCTR-Torch 0.3.0's DIN and DIEN (AUGRU, auxiliary loss on sampled negatives) see the ID "
            "fields only (item, genre; MovieLens has no brand or shop), with our widths, optimiser, "
            "clipping, early stopping and seeds. Their dense layers get our Glorot initialisation: with "
            "DeepCTR's own (std 1e-4, made for Adam) neither learns under AdaGrad. BaseModel+IDs is ours "
            "on the same IDs-only inputs; our DIN and DIEN see every modality.\n\n"
            + model_table({**runs, **references}, [*REFERENCES, *ours], paper=False)
        )
    if pop_md:
        sections.append(
            "## Table 4 analogue: AUC by item popularity\n\nTest items cut into 10 equal-frequency "
            "levels by their training clicks (level 0 the least popular); AUC of each level's test "
            f"samples, mean over seeds.\n\n{pop_md}"
        )
    if cold_md:
        held = cold.get("held_out") or {}
        sections.append(
            "## Table 5 analogue: recall of items unseen in training\n\n"
            f"{100 * held.get('share', float('nan')):.0f}% of the items (seed {held.get('seed')}) are held "
            "out: their samples leave train and valid and they are cut out of train and valid histories. "
            "Each test user who clicked a held-out item ranks every held-out test item; recall@N is the "
            f"share whose click is in the top N (mean ± std over seeds).\n\n{cold_md}"
        )
    for key, title in (
        ("fig4", "Figure 4 analogue: modality attention by genre"),
        ("fig5", "Figure 5 analogue: t-SNE of modality-specific and -invariant features"),
        ("fig6a", "Figure 6a analogue: training losses"),
        ("fig6b", "Figure 6b analogue: validation AUC against lambda0"),
    ):
        if key in figures:
            sections.append(f"## {title}\n\n![{title}]({figures[key]})")
    (out / f"{RESULTS}.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out / RESULTS}.md, {out / RESULTS}.json and {len(figures)} figures in {fig_dir}")


def _setup_text(
    cfg,
    dataset,
    tune_reports: dict[str, dict[str, Any]],
    seeds: int,
    complete: int,
    total: int,
    test_users: int = 0,
    typical: float = 0.85,
) -> str:
    from marn.data.schema import item_stat_columns

    m, t = cfg.model, cfg.train
    lam = (
        ", ".join(f"{LABELS.get(row, row)} {r['best']['lambda0']:.3g}" for row, r in tune_reports.items())
        if tune_reports
        else "not tuned yet"
    )
    items = dataset.items
    with_image = int(items["image_uri"].notna().sum())
    stats = ", ".join(item_stat_columns(items)) or "none"
    return (
        "## Setup\n\n"
        f"- Data: {dataset.events['user_id'].nunique():,} users, {len(items):,} items "
        f"({with_image:,} with an image), {len(dataset.events):,} events. Modalities: IDs (item, category), "
        "image (MobileNetV2 ImageNet features from `marn embed`; the paper used VGG16 fc7), title text "
        f"(GloVe words, Kim CNN), statistics (event counts before the held-out events; {stats}).\n"
        "- DIN protocol: each user's last event is test, the one before valid, earlier ones train; one "
        f"sampled negative per positive; history = the {cfg.samples.max_history} most recent events.\n"
        f"- Training: AdaGrad lr {t.lr} for every model, batch {t.batch_size}, at most {t.epochs} epochs, "
        f"early stopping on validation AUC (patience {t.patience}); the test split is scored once, with the "
        "best validation epoch's weights.\n"
        f"- Widths (the paper's: 96, 256, not given, 100; narrower ones fit 2 cores): modality "
        f"{m.modality_dim}, representation s^m, c^m {m.rep_dim}, GRU {m.sequence_dim}, {m.title_filters} "
        f"title filters per window, MLP {list(m.hidden)}.\n"
        f"- lambda0 chosen by Ray Tune on validation AUC for each adversarial variant: {lam} (a switch "
        "row trains with MARN's unless it searched its own).\n"
        f"- {seeds} seeds per model (initialisation and batch order; the split and negatives are fixed); "
        f"{complete} of {total} models have all {seeds}. t-tests are Welch's over seeds: they say whether a "
        "model is reliably ahead on this split, not on another sample of users.\n"
        + (
            f"- The test split has {test_users} positives and as many negatives; at AUC {typical:.2f} its "
            f"sampling standard error is about {auc_standard_error(typical, test_users, test_users):.3f} "
            "(Hanley & McNeil), so differences smaller than that may not carry over to other users.\n"
            if test_users
            else ""
        )
    )
