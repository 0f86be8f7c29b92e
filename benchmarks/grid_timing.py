"""How long the paper grid takes when every run trains to convergence: one seed of every model, timed.

    python -m benchmarks.grid_timing --data DATA --work WORK            # every paper model, seed 1
    python -m benchmarks.grid_timing --data DATA --work WORK --models marn,din --max-epochs 30

Each model trains exactly as ``benchmarks/paper.py run`` trains it (``paper.train_one``: the paper config,
early stopping on validation AUC with the config's patience, one thread), except that the epoch cap is
raised to ``--max-epochs`` so early stopping, not the cap, ends every run. ``--workers`` runs go at once
(one per core, in the paper's order), like the grid's Ray tasks. Printed per model: epochs run, the best
epoch, whether early stopping ended it, wall and CPU seconds; then the measured wall time of this run and
the projected wall time of the full grid (``--seeds`` seeds of every model on ``--workers`` cores, from the
CPU seconds measured here, scheduled longest first). The lambda0 search of ``paper.py run`` is not part of
this timing (its trials are capped by ``tune.max_epochs``); the projection says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.paper import DEFAULT_CONFIG, hardware, paper_models, row_config, train_one
from marn.config import Config, load_config
from marn.data.schema import read_dataset
from marn.train import RunInputs, prepare_inputs

_INPUTS: RunInputs | None = None  # built once per worker process (spawned workers share nothing)


def _worker_init(data: str, config: str, threads: str) -> None:
    global _INPUTS
    os.environ["OMP_NUM_THREADS"] = threads
    _INPUTS = prepare_inputs(read_dataset(data), load_config(config))


def _timed_run(cfg: Config, row: str, seed: int, out_dir: str) -> dict[str, Any]:
    assert _INPUTS is not None, "worker not initialised"
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_one(_INPUTS, cfg, row, seed, out_dir)
    metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
    return {
        "row": row,
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics.get("best_epoch"),
        "stopped_early": metrics["epochs_run"] < cfg.train.epochs,
        "valid_auc": metrics["valid"]["auc"],
        "test_auc": result["auc"],
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }


def longest_first_makespan(costs: list[float], workers: int) -> float:
    """Wall time of running ``costs`` on ``workers`` cores, each next job on the first free core, longest
    first (the grid's order)."""
    cores = [0.0] * workers
    for cost in sorted(costs, reverse=True):
        cores[cores.index(min(cores))] += cost
    return max(cores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="imported and embedded MovieLens directory")
    parser.add_argument("--work", type=Path, required=True, help="the runs are written here")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument(
        "--models", type=lambda s: s.split(","), default=None, help="default: every paper model"
    )
    parser.add_argument("--max-epochs", type=int, default=40, help="an epoch cap early stopping must beat")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per model in the projected grid")
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one core each")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.max_epochs < 1 or args.workers < 1 or args.seeds < 1:
        parser.error("--max-epochs, --workers and --seeds must be at least 1")

    base = load_config(str(args.config))
    base = Config.model_validate(
        {**base.model_dump(), "train": {**base.train.model_dump(), "epochs": args.max_epochs}}
    )
    rows = list(args.models or paper_models())
    unknown = sorted(set(rows) - set(paper_models()))
    if unknown:
        parser.error(f"not paper models: {unknown}")
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    init = (str(args.data), str(args.config), "1")
    with ProcessPoolExecutor(
        args.workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=init
    ) as pool:
        jobs = {
            pool.submit(
                _timed_run, row_config(base, row), row, args.seed, str(args.work / row / f"seed-{args.seed}")
            ): row
            for row in rows
        }
        for job in as_completed(jobs):
            r = job.result()
            results.append(r)
            print(
                f"[{len(results)}/{len(rows)}] {r['row']}: {r['epochs_run']} epochs (best {r['best_epoch']}, "
                f"{'early stop' if r['stopped_early'] else 'HIT THE CAP'}), wall {r['wall_s']:.0f} s, "
                f"cpu {r['cpu_s']:.0f} s, test AUC {r['test_auc']:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - started
    costs = [r["cpu_s"] for r in results] * args.seeds
    projected = longest_first_makespan(costs, args.workers)
    capped = [r["row"] for r in results if not r["stopped_early"]]
    print(f"this run: {len(rows)} models x 1 seed in {wall / 60:.1f} min wall on {args.workers} workers")
    print(
        f"projected grid: {len(rows)} models x {args.seeds} seeds on {args.workers} cores = "
        f"{projected / 3600:.2f} h (from the CPU seconds above, longest first; lambda0 search not included)"
    )
    if capped:
        print(f"runs that hit the {args.max_epochs}-epoch cap: {', '.join(capped)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "command": " ".join(sys.argv),
            "hardware": hardware(),
            "max_epochs": args.max_epochs,
            "workers": args.workers,
            "seeds_projected": args.seeds,
            "wall_s": wall,
            "projected_grid_s": projected,
            "runs": sorted(results, key=lambda r: rows.index(r["row"])),
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
