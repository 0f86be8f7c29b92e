"""The report's figures (PNG, matplotlib's Agg backend): Figures 4-6 analogues and the AUC overview."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.paper_report.runs import LABELS, Summary
from marn.data.schema import Dataset
from marn.data.stats import earliest_time, item_stat_table
from marn.data.tensors import stat_codes
from marn.train import load_trained


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
