"""What the paper runs wrote, read back: the model rows of Tables 2 and 3, their labels and the paper's
numbers, each model's metrics over seeds, the popularity and held-out-item metrics, the Tune reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from marn.train import METRICS

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
BATCH_SIDE_ROWS = ("marn", "din")  # the side experiment at the paper's batch size (benchmarks/paper.py)
SIDE_BATCH_SIZE = 32  # the paper's (4.1)
# MARN with one of its adversary's ModelConfig switches flipped from the faithful default (issue 16): row ->
# (the registered model it trains, the fields it changes). benchmarks/paper.py trains them beside the tables.
SWITCH_ROWS: dict[str, tuple[str, dict[str, str]]] = {
    "marn_w_raw": ("marn", {"d1_weights": "raw"}),
    "marn_reversal_into_e": ("marn", {"reversal_reaches": "embedding"}),
    "marn_before_issue16": ("marn", {"d1_weights": "raw", "reversal_reaches": "embedding"}),
    "marn_pool_per_item": ("marn", {"pool_weights": "per_item"}),
    "marn_lambda_grl": ("marn", {"lambda_role": "reversal"}),
    "marn_lambda_paper": ("marn", {}),  # lambda0 below instead of MARN's tuned one
    "marn_ds_own": ("marn", {"ds_weights": "own"}),
}
# Rows trained at a fixed lambda0 rather than their search's best (with the search's schedule horizon, so
# that lambda0 is all that differs): the paper's best for MARN (4.7), beside a search whose validation AUCs
# lie within one seed's spread of each other.
FIXED_LAMBDA0 = {"marn_lambda_paper": 0.05}
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
    "marn_lambda_paper": "MARN, the paper's lambda0 0.05 (not tuned)",
    "marn_ds_own": "MARN, Ds with its own weights (not D1's)",
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


def _seed_metrics(root: Path, name: str, seeds: int) -> list[dict[str, Any]]:
    paths = [root / name / f"seed-{s}" / METRICS for s in range(1, seeds + 1)]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def popularity_table(
    work: Path, seeds: int, names: Sequence[str] = ("base_ids", "marn")
) -> dict[str, Any] | None:
    """AUC per item-popularity level, each seed's list per level, for ``names`` (by default BaseModel+IDs and
    MARN: Table 4); None unless every one of them has a finished seed."""
    per_model: dict[str, Any] = {}
    for name in names:
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


def batch_side_table(work: Path, seeds: int, grid_batch: int) -> dict[str, Any] | None:
    """The batch-size side experiment beside the same rows of the grid: per row and batch size, the
    per-seed test AUC, user AUC, epochs run, best epoch and wall seconds; None before any side run."""
    side = read_runs(work / f"batch{SIDE_BATCH_SIZE}", BATCH_SIDE_ROWS, seeds)
    if not side:
        return None
    grid = read_runs(work / "runs", list(side), seeds)

    def columns(s: Summary) -> dict[str, list[Any]]:
        return {
            "auc": s.auc,
            "user_auc": s.user_auc,
            "epochs_run": s.epochs,
            "best_epoch": s.best_epochs,
            "wall_s": s.wall_s,
        }

    return {
        row: {
            str(b): columns(runs[row])
            for b, runs in ((grid_batch, grid), (SIDE_BATCH_SIZE, side))
            if row in runs
        }
        for row in side
    }


def read_tune_reports(work: Path) -> dict[str, dict[str, Any]]:
    """Each searched row's ``tune.json`` (``WORK/tune/ROW/``); a work dir from before the per-variant
    searches has one MARN search at ``WORK/tune/tune.json``."""
    reports = {p.parent.name: json.loads(p.read_text()) for p in sorted((work / "tune").glob("*/tune.json"))}
    legacy = work / "tune" / "tune.json"
    if not reports and legacy.exists():
        reports["marn"] = json.loads(legacy.read_text())
    return reports
