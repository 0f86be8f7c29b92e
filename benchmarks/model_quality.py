"""Train several registered models on one dataset at one budget and print their test metrics side by side.

    python benchmarks/model_quality.py --data DIR --models base_ids,dupn,marn --epochs 5 --out runs/quality

Every model gets the same samples, item features, seed, optimiser and epoch budget (``configs/local.yaml``
unless --config); each run writes ``OUT/<model>/metrics.json`` and ``model.pt`` as ``marn train`` does,
and the table is also written to ``OUT/summary.md`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from marn.config import load_config
from marn.data.item_features import build_item_features
from marn.data.samples import build_samples
from marn.data.schema import read_dataset
from marn.data.tensors import ItemCatalog, fit_statistics
from marn.models import model_names
from marn.train import train_model

COLUMNS = ("model", "auc", "user_auc", "logloss", "best_epoch", "epochs_run", "train_s_per_epoch", "wall_s")


def run(data: Path, models: list[str], out: Path, epochs: int, batch_size: int | None, config: Path | None):
    unknown = sorted(set(models) - set(model_names()))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; registered: {', '.join(model_names())}")
    dataset = read_dataset(data)
    base = load_config(config)
    catalog = ItemCatalog.from_items(dataset.items)  # the same codes train_model derives
    samples = build_samples(dataset, base.samples)  # once for all, as the features
    statistics = fit_statistics(samples.train, base.model.stats_buckets)
    features = build_item_features(dataset, catalog, base.features, statistics)
    rows = []
    for i, name in enumerate(models, 1):
        train = {"model": name, "epochs": epochs}
        if batch_size:
            train["batch_size"] = batch_size
        cfg = load_config(config, {"train": train})
        print(f"[{i}/{len(models)}] {name}: training up to {epochs} epoch(s) on {data}", flush=True)
        started = time.perf_counter()
        metrics = train_model(
            dataset, cfg, out / name, show_progress=False, features=features, samples=samples
        ).metrics
        history = metrics["history"]
        rows.append(
            {
                "model": name,
                "auc": metrics["auc"],
                "user_auc": metrics["user_auc"],
                "logloss": metrics["logloss"],
                "best_epoch": metrics["best_epoch"],
                "epochs_run": metrics["epochs_run"],
                "train_s_per_epoch": sum(h["seconds"] for h in history) / len(history),
                "wall_s": time.perf_counter() - started,
            }
        )
        print(f"    test auc {metrics['auc']:.4f}  user_auc {metrics['user_auc']:.4f}", flush=True)
    table = _markdown(rows)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    summary = {"data": str(data), "epochs": epochs, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS[:-2]]
        cells += [f"{row['train_s_per_epoch']:.1f}", f"{row['wall_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="a canonical dataset directory")
    parser.add_argument("--models", default=",".join(model_names()), help="comma-separated registry names")
    parser.add_argument("--out", type=Path, required=True, help="one run directory per model goes here")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--config", type=Path, default=None, help="default: the built-in defaults")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.data, [m.strip() for m in args.models.split(",") if m.strip()], args.out, args.epochs,
        args.batch_size, args.config)  # fmt: skip


if __name__ == "__main__":
    main()
