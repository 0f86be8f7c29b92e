"""What point-in-time statistics change, on one dataset: a few models, popularity alone, held-out items.

    python -m benchmarks.point_in_time --data DATA --work WORK [--config configs/paper-movielens.yaml]
        [--before DIR]   # finished runs of the same models from before the change (DIR/MODEL/metrics.json)

1. Trains ``--models`` (default lr, popularity, base_ids, marn, din) for one seed with ``marn.train``, each
   skipped when ``WORK/MODEL/metrics.json`` exists, and tabulates test AUC / user AUC / logloss, beside
   the ``--before`` runs when given.
2. Popularity as a ranker, no training: test and validation AUC of ranking the samples by the
   candidate's ``n_events`` as the model receives it (as of the sample's time).
3. Table 5's held-out items (``benchmarks/paper.py``'s cold split, share 0.1, seed 7): recall@10/20/50 of
   the clicked held-out item among all held-out items ranked by that count alone, as of each user's test
   time. With counts over the whole log this ranker beat BaseModel+IDs.

Writes ``WORK/point-in-time.json`` and prints a markdown report (``--out FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marn.config import load_config
from marn.data.samples import STAT_COLUMN, build_samples
from marn.data.schema import read_dataset
from marn.data.stats import stat_names, stats_before
from marn.evaluate import auc, recall_at_n
from marn.train import METRICS, prepare_inputs, train_model

REPO = Path(__file__).resolve().parents[1]
MODELS = ("lr", "popularity", "base_ids", "marn", "din")


def train_all(
    data: Path, work: Path, config: Path, models: list[str], seed: int
) -> dict[str, dict[str, Any]]:
    dataset = read_dataset(data)
    out = {}
    for name in models:
        run = work / name
        if not (run / METRICS).exists():
            print(f"[train] {name} seed {seed}", flush=True)
            cfg = load_config(config, {"train": {"model": name, "seed": seed}})
            train_model(dataset, cfg, run, show_progress=False)
        out[name] = json.loads((run / METRICS).read_text())
    return out


def popularity_ranker(data: Path, config: Path) -> dict[str, Any]:
    """AUC of the samples ranked by their candidate's raw point-in-time count, and Table 5's recall of
    that ranking over the held-out items."""
    from benchmarks.paper import cold_inputs  # the held-out split of the paper benchmark

    dataset = read_dataset(data)
    cfg = load_config(config)
    samples = build_samples(dataset, cfg.samples)
    ranks: dict[str, Any] = {}
    for split in ("valid", "test"):
        table = samples.split(split)
        count = table.column(STAT_COLUMN.format("n_events")).to_numpy()
        ranks[f"{split}_auc"] = auc(table.column("label").to_numpy(), count)
    inputs = prepare_inputs(dataset, cfg, samples=samples)
    held, pool = cold_inputs(dataset, inputs, share=0.1, seed=7)
    test = held.test
    positives = torch.nonzero((test.tensors["label"] == 1) & torch.isin(test.tensors["item"], pool)).flatten()
    ids = np.asarray(("", *inputs.catalog.items.values), dtype=object)
    times = np.repeat(test.times[positives.numpy()], len(pool))
    values = stats_before(held.item_stats, np.tile(ids[pool.numpy()], len(positives)), times)
    j = stat_names(held.item_stats).index("n_events")
    scores = values[:, j].reshape(len(positives), len(pool))
    targets = torch.searchsorted(pool, test.tensors["item"][positives]).numpy()
    ranks["held_out"] = {
        "users": len(positives),
        "pool": len(pool),
        "recall": recall_at_n(scores, targets, (10, 20, 50)),
    }
    return ranks


def report(runs: dict[str, dict], before: dict[str, dict], ranker: dict[str, Any]) -> str:
    lines = [
        "| model | test AUC before | test AUC | user AUC | logloss | best epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in runs.items():
        old = f"{before[name]['auc']:.4f}" if name in before else "n/a"
        lines.append(
            f"| {name} | {old} | {m['auc']:.4f} | {m['user_auc']:.4f} | {m['logloss']:.4f} | "
            f"{m['best_epoch']}/{m['epochs_run']} |"
        )
    held = ranker["held_out"]
    recall = ", ".join(f"@{n} {v:.1%}" for n, v in held["recall"].items())
    lines += [
        "",
        f"Ranking the samples by the candidate's point-in-time count alone: validation AUC "
        f"{ranker['valid_auc']:.4f}, test AUC {ranker['test_auc']:.4f}.",
        f"Held-out items (Table 5; {held['users']} test users, a pool of {held['pool']} items) ranked by "
        f"that count as of each user's test time: recall {recall}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "paper-movielens.yaml")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--before", type=Path, default=None, help="runs from before the change, per model")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = train_all(args.data, args.work, args.config, args.models, args.seed)
    before = {}
    if args.before is not None:
        for name in args.models:
            path = args.before / name / METRICS
            if path.exists():
                before[name] = json.loads(path.read_text())
    ranker = popularity_ranker(args.data, args.config)
    text = report(runs, before, ranker)
    summary = {
        "runs": {
            n: {k: m[k] for k in ("auc", "user_auc", "logloss", "best_epoch", "epochs_run")}
            for n, m in runs.items()
        },
        "before": {n: m["auc"] for n, m in before.items()},
        "ranker": ranker,
    }
    (args.work / "point-in-time.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
