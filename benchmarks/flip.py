"""ALT/FLIP's measured effect (issue 19 item 3): arms x seeds on one dataset, paired deltas of test AUC.

    python -m benchmarks.flip --data DATA --work WORK [--config configs/flip-movielens.yaml] [--seeds 5]
        [--arms flip_id random_init ...] [--out benchmarks/results/flip-movielens]

Every arm trains ``flip.tower`` (base_ids unless the config says otherwise) through marn.flip.run_flip with
the config's train section; only the seed (``train.seed`` = ``flip.seed``) changes between an arm's runs.
Model selection is early stopping on validation AUC inside each run; the test split is scored once per run
and read only here. The prompt cache is built once (the encoder is frozen and seed-free) and shared.

Arms: ``random_init`` (the tower alone, no pretraining), ``flip_id`` (strategy 1 after ICL + MTM + MLM),
``late_fusion`` (tower + an MLP over the frozen MiniLM prompt vector, mixed as in FLIP, no pretraining: the
MiniLM vector as a plain input), ``flip_joint``, ``flip_text``, and the ablations ``flip_id_no_icl``,
``flip_id_no_mtm``, ``flip_id_no_mlm``, ``flip_id_icl_only``. Comparisons are paired per seed: mean delta
AUC with a 95% t interval; a gain counts only when the interval excludes 0.

A finished run (``WORK/ARM/seed-N/flip_metrics.json``) is read back, not retrained, so an interrupted
benchmark resumes; one pretraining per seed and loss set (``WORK/pretrained/``) serves every strategy.
WORK is claimed for one config and one DATA (``WORK/claim.json``, :mod:`benchmarks.work_claim`): a run with
other settings into it is refused, so old and new runs are never paired.
Writes ``OUT.json`` and ``OUT.md`` with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import ledger
from benchmarks.paper_report import significance
from benchmarks.work_claim import claim_work, work_settings
from marn.config import Config, load_config
from marn.data.schema import Dataset, read_dataset
from marn.flip.run import FLIP_METRICS, FlipInputs, prepare_flip_inputs, run_flip
from marn.flip.text import TextEncoder

REPO = Path(__file__).resolve().parents[1]
ALL_LOSSES = ("icl", "mtm", "mlm")


@dataclass(frozen=True)
class Arm:
    strategy: str
    pretrained: bool
    losses: tuple[str, ...] = ALL_LOSSES


ARMS = {
    "random_init": Arm("id", pretrained=False),
    "flip_id": Arm("id", pretrained=True),
    "late_fusion": Arm("joint", pretrained=False),
    "flip_joint": Arm("joint", pretrained=True),
    "flip_text": Arm("text", pretrained=True),
    "flip_id_no_icl": Arm("id", pretrained=True, losses=("mtm", "mlm")),
    "flip_id_no_mtm": Arm("id", pretrained=True, losses=("icl", "mlm")),
    "flip_id_no_mlm": Arm("id", pretrained=True, losses=("icl", "mtm")),
    "flip_id_icl_only": Arm("id", pretrained=True, losses=("icl",)),
}
# What --ledger keeps (benchmarks/ledger.py): each run's metrics and the claim; a pretraining is redone
# (one per seed and loss set) when a later strategy of it is still to run
LEDGER = ledger.Layout(finished=f"*/seed-*/{FLIP_METRICS}", kept=("claim.json",))
# (arm, reference): what each paired delta answers
COMPARISONS = (
    ("flip_id", "random_init"),  # does alignment pretraining help the served ID tower?
    ("flip_joint", "late_fusion"),  # does it help beyond feeding the MiniLM vector as a plain input?
    ("flip_joint", "flip_id"),  # does keeping the text tower at serving time pay?
    ("flip_text", "random_init"),
    ("flip_id_no_icl", "flip_id"),
    ("flip_id_no_mtm", "flip_id"),
    ("flip_id_no_mlm", "flip_id"),
    ("flip_id_icl_only", "flip_id"),
)


def run_arms(
    dataset: Dataset,
    cfg: Config,
    work: Path,
    seeds: list[int],
    arms: list[str],
    encoder: TextEncoder | None = None,
    on_finished: Callable[[], object] = lambda: None,
) -> dict[str, dict[int, dict[str, Any]]]:
    """arm -> seed -> that run's flip_metrics.json (trained unless it exists; ``on_finished()`` after each
    one trained)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    claim_work(work, work_settings("flip", cfg, dataset.root))  # before any run in WORK is read back
    inputs: FlipInputs | None = None
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in arms:
        spec = ARMS[arm]
        for seed in seeds:
            run = work / arm / f"seed-{seed}"
            if not (run / FLIP_METRICS).exists():
                if inputs is None:
                    inputs = prepare_flip_inputs(dataset, cfg, encoder)
                print(f"[flip] {arm} seed {seed}", flush=True)
                overrides = {
                    "train.seed": seed,
                    "flip.seed": seed,
                    "flip.strategy": spec.strategy,
                    "flip.losses": list(spec.losses),
                }
                store = (
                    work / "pretrained" / f"seed-{seed}-{'-'.join(spec.losses)}.pt"
                )  # shared by strategies
                run_flip(dataset, cfg.with_overrides(overrides), run, inputs, spec.pretrained, False, store)
                on_finished()
            out.setdefault(arm, {})[seed] = json.loads((run / FLIP_METRICS).read_text())
    return out


def paired_delta(runs: dict[str, dict[int, dict[str, Any]]], arm: str, reference: str) -> dict[str, Any]:
    """Mean test-AUC delta of ``arm`` over ``reference`` on the seeds both ran, with a 95% t interval."""
    auc = {name: {s: m["auc"] for s, m in runs.get(name, {}).items()} for name in (arm, reference)}
    return {"arm": arm, "reference": reference} | significance.paired_delta(auc[arm], auc[reference])


def summarise(runs: dict[str, dict[int, dict[str, Any]]], command: str) -> dict[str, Any]:
    arms = {
        arm: {
            "seeds": sorted(by_seed),
            "auc": [by_seed[s]["auc"] for s in sorted(by_seed)],
            "valid_auc": [by_seed[s]["valid"]["auc"] for s in sorted(by_seed)],
            "user_auc": [by_seed[s]["user_auc"] for s in sorted(by_seed)],
            "logloss": [by_seed[s]["logloss"] for s in sorted(by_seed)],
            "pretrain_s": [by_seed[s]["pretrain_s"] for s in sorted(by_seed)],
            "finetune_s": [by_seed[s]["finetune_s"] for s in sorted(by_seed)],
        }
        for arm, by_seed in runs.items()
    }
    comparisons = [paired_delta(runs, a, r) for a, r in COMPARISONS if a in runs and r in runs]
    return {"command": command, "arms": arms, "comparisons": comparisons}


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# ALT/FLIP on the leak-free split: paired test AUC",
        "",
        f"Command: `{summary['command']}`",
        "",
        "| arm | seeds | test AUC (mean ± sd) | valid AUC | user AUC | logloss | pretrain s | finetune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary["arms"].items():
        auc = np.array(row["auc"])
        sd = auc.std(ddof=1) if len(auc) > 1 else float("nan")
        lines.append(
            f"| {arm} | {len(auc)} | {auc.mean():.4f} ± {sd:.4f} | {np.mean(row['valid_auc']):.4f} | "
            f"{np.mean(row['user_auc']):.4f} | {np.mean(row['logloss']):.4f} | "
            f"{np.mean(row['pretrain_s']):.0f} | {np.mean(row['finetune_s']):.0f} |"
        )
    lines += ["", *significance.comparison_table(summary["comparisons"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an imported dataset directory")
    parser.add_argument("--work", type=Path, required=True, help="runs go to WORK/ARM/seed-N")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "flip-movielens.yaml")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N per arm")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "flip-movielens")
    parser.add_argument(
        "--ledger", type=Path, default=None, help="restore finished runs from here first, save new ones here"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    command = "python -m benchmarks.flip " + shlex.join(sys.argv[1:] if argv is None else argv)
    save = ledger.attach(LEDGER, args.ledger, args.work, args.data)
    runs = run_arms(
        read_dataset(args.data),
        load_config(args.config),
        args.work,
        list(range(1, args.seeds + 1)),
        args.arms,
        on_finished=save,
    )
    summary = summarise(runs, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
