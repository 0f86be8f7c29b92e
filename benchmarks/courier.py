"""COURIER's measured effect (issue 19 item 3): image-vector arms x models x seeds, paired deltas of test AUC.

    python -m benchmarks.courier --data DATA --work WORK [--config configs/paper-movielens.yaml] [--seeds 5]
        [--models marn din] [--arms imagenet imagenet_pca courier courier_permuted]
        [--out benchmarks/results/courier-movielens]

DATA is an imported and embedded dataset (``marn embed``: ``image_embeddings.parquet``, the frozen
backbone's poster vectors). Every run trains as the paper benchmark trains (``benchmarks.paper.train_one``:
the config's widths, AdaGrad, early stopping on validation AUC, one thread; MARN at the config's lambda0,
not searched); only the item image vectors differ between arms:

- ``imagenet``: the backbone's vectors as they are (1280-d for MobileNetV2);
- ``imagenet_pca``: the same reduced by PCA to COURIER's ``embed.courier.dim``, fitted on the catalogue's
  poster vectors (item content only, no events): does COURIER beat a plain reduction to its size?
- ``courier``: the COURIER head's vectors (:mod:`marn.embed.courier`), trained per seed
  (``embed.courier.seed`` = the seed) on the training split's clicks into ``WORK/courier/seed-K`` (the
  dataset's files linked, the table and ``courier_metrics.json`` beside them);
- ``courier_permuted``: the same vectors handed to other items (a seeded permutation among the items with a
  poster): does the gain come from what the vectors say about each item, or from their size and scale?

Items without a poster keep an all-zero vector in every arm. Model selection is early stopping on
validation AUC inside each run; the test split is scored once per run and read only here. Comparisons are
paired per seed (the same seed trains both arms): mean delta AUC with a 95% t interval; a gain counts only
when the interval excludes 0. A finished run (``WORK/MODEL/ARM/seed-K/metrics.json``) is read back, not
retrained, so an interrupted benchmark resumes. WORK is claimed for one config and one DATA
(``WORK/claim.json``, :mod:`benchmarks.work_claim`): a run with other settings into it is refused, so old and
new runs are never paired. A run's ``metrics.json`` names its ``arm``, and the courier arms' ``model.pt``
records the config they trained with (``embed.method`` courier, ``embed.courier.seed`` = the seed). Writes
``OUT.json`` and ``OUT.md`` with the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import ledger
from benchmarks.paper import DEFAULT_CONFIG, row_config, train_one
from benchmarks.paper_report import significance
from benchmarks.work_claim import claim_work, work_settings
from marn.config import Config, load_config
from marn.data.files import write_text_atomic
from marn.data.samples import Samples, build_samples
from marn.data.schema import COURIER_EMBEDDINGS, COURIER_HEAD, IMAGE_EMBEDDINGS, read_dataset
from marn.embed.courier import COURIER_METRICS, train_courier
from marn.train import METRICS, RunInputs, prepare_inputs

REPO = Path(__file__).resolve().parents[1]
ARMS = ("imagenet", "imagenet_pca", "courier", "courier_permuted")
COURIER_ARMS = ("courier", "courier_permuted")  # the arms whose vectors come from WORK/courier/seed-K
# DATA's own COURIER files: never read here (the seed dirs train their own), so not part of WORK's claim
COURIER_FILES = (COURIER_EMBEDDINGS, COURIER_HEAD, COURIER_METRICS)
MODELS = ("marn", "din")
# What --ledger keeps (benchmarks/ledger.py): the runs' metrics, each head's metrics, vector table and weights
# (about 1.4 MB: a table is read with the head that wrote it)
LEDGER = ledger.Layout(
    finished=f"*/*/seed-*/{METRICS}",
    kept=("claim.json",),
    beside=((f"courier/seed-*/{COURIER_METRICS}", (COURIER_METRICS, COURIER_EMBEDDINGS, COURIER_HEAD)),),
    data_exclude=COURIER_FILES,
)
# (arm, reference): what each paired delta answers
COMPARISONS = (
    ("courier", "imagenet"),  # the method's claim: behaviour-trained vectors beat generic ones
    ("courier", "imagenet_pca"),  # ... beyond what a reduction to the same size does
    ("courier", "courier_permuted"),  # ... because of what they say about each item
    ("imagenet_pca", "imagenet"),
)


def pca_rows(image: np.ndarray, dim: int) -> np.ndarray:
    """(N, D) item vectors -> (N, dim) their principal components, fitted on the rows with a poster (the
    all-zero rows, items without one, stay zero)."""
    has = np.abs(image).sum(1) > 0
    out = np.zeros((len(image), dim), dtype=np.float32)
    if has.sum() < 2:
        return out
    rows = image[has].astype(np.float64)
    centred = rows - rows.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(dim, vt.shape[0])
    out[has, :k] = (centred @ vt[:k].T).astype(np.float32)
    return out


def permuted_rows(image: np.ndarray, seed: int) -> np.ndarray:
    """(N, D) item vectors -> the same vectors moved to other items: a seeded permutation among the rows
    with a poster; rows without one stay zero."""
    has = np.flatnonzero(np.abs(image).sum(1) > 0)
    out = image.copy()
    out[has] = image[np.random.default_rng(seed).permutation(has)]
    return out


def courier_dir(data: Path, work: Path, cfg: Config, seed: int, samples: Samples) -> Path:
    """``WORK/courier/seed-K``: the dataset's files linked, COURIER trained there with ``seed`` (once)."""
    out = work / "courier" / f"seed-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for entry in data.iterdir():  # also beside a table restored from a ledger, which keeps no links
        link = out / entry.name
        if entry.name not in COURIER_FILES and not link.exists():
            link.symlink_to(entry.resolve())
    if (out / COURIER_EMBEDDINGS).exists():
        return out
    started = time.perf_counter()
    print(f"[courier] training the head, seed {seed}", flush=True)
    summary = train_courier(
        out,
        samples.train,
        samples.valid,
        cfg.embed.courier.model_copy(update={"seed": seed}),
        report=lambda line: print(f"[courier seed {seed}] {line}", flush=True),
    )
    print(
        f"[courier] seed {seed}: valid recall@{summary.recall_k} {summary.recall} "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return out


def arm_inputs(
    arm: str, data: Path, work: Path, cfg: Config, seed: int, samples: Samples, imagenet: RunInputs
) -> RunInputs:
    """The run inputs of ``arm`` for ``seed``: ``imagenet`` (built once by the caller), other image rows."""
    if arm == "imagenet":
        return imagenet
    if arm == "imagenet_pca":
        image = pca_rows(imagenet.features.image, cfg.embed.courier.dim)
        return replace(imagenet, features=replace(imagenet.features, image=image))
    seed_dir = courier_dir(data, work, cfg, seed, samples)
    courier_cfg = cfg.with_overrides({"embed.method": "courier"})
    inputs = prepare_inputs(read_dataset(seed_dir), courier_cfg, samples=samples)
    if arm == "courier":
        return inputs
    if arm == "courier_permuted":
        image = permuted_rows(inputs.features.image, seed)  # no longer what the head maps: not kept
        return replace(inputs, features=replace(inputs.features, image=image, image_head=None))
    raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


def arm_config(arm: str, cfg: Config, seed: int) -> Config:
    """The config ``arm``'s run records (``train_one`` saves it in ``model.pt``): the courier arms' vectors
    come from the head trained with ``embed.courier.seed`` = ``seed``. Only ``embed`` changes, which
    ``train_one`` does not read (the image rows are in the run inputs), so training is the same."""
    if arm in COURIER_ARMS:
        return cfg.with_overrides({"embed.method": "courier", "embed.courier.seed": seed})
    return cfg


def run_arms(
    data: Path,
    cfg: Config,
    work: Path,
    seeds: list[int],
    arms: list[str],
    models: list[str],
    on_finished: Callable[[], object] = lambda: None,
) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """model -> arm -> seed -> that run's metrics.json (trained unless it exists; ``on_finished()`` after
    each one trained)."""
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    if not (data / IMAGE_EMBEDDINGS).exists():
        raise FileNotFoundError(f"{data / IMAGE_EMBEDDINGS} is missing: run `marn embed --data {data}` first")
    cfg = cfg.with_overrides({"embed.method": "imagenet", "features.image": "embeddings"})
    claim_work(work, work_settings("courier", cfg, data, exclude=COURIER_FILES))  # before WORK is read
    dataset = read_dataset(data)
    samples = build_samples(dataset, cfg.samples)
    imagenet = prepare_inputs(dataset, cfg, samples=samples)
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for seed in seeds:  # seed-major: an interrupted benchmark has whole seeds to compare
        for arm in arms:
            inputs: RunInputs | None = None
            for model in models:
                run = work / model / arm / f"seed-{seed}"
                if not (run / METRICS).exists():
                    if inputs is None:
                        inputs = arm_inputs(arm, data, work, cfg, seed, samples, imagenet)
                    print(f"[courier] {model} {arm} seed {seed}", flush=True)
                    train_one(inputs, row_config(arm_config(arm, cfg, seed), model), model, seed, str(run))
                    named_arm(run / METRICS, arm)
                    on_finished()
                out.setdefault(model, {}).setdefault(arm, {})[seed] = named_arm(run / METRICS, arm)
    return out


def named_arm(path: Path, arm: str) -> dict[str, Any]:
    """A run's metrics, with ``arm`` added to the file (atomically) if ``train_one`` left it out."""
    metrics = json.loads(path.read_text())
    if metrics.get("arm") != arm:
        if "arm" in metrics:
            raise ValueError(f"{path} names arm {metrics['arm']!r}, but it is in {arm!r}'s directory")
        metrics["arm"] = arm
        write_text_atomic(path, json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    return metrics


def summarise(
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]], work: Path, command: str
) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for model, by_arm in runs.items():
        aucs = {arm: {s: m["auc"] for s, m in by_seed.items()} for arm, by_seed in by_arm.items()}
        models[model] = {
            "arms": {
                arm: {
                    "seeds": sorted(by_seed),
                    "auc": [by_seed[s]["auc"] for s in sorted(by_seed)],
                    "user_auc": [by_seed[s]["user_auc"] for s in sorted(by_seed)],
                    "epochs_run": [by_seed[s]["epochs_run"] for s in sorted(by_seed)],
                    "wall_s": [by_seed[s]["wall_s"] for s in sorted(by_seed)],
                }
                for arm, by_seed in by_arm.items()
            },
            "comparisons": [
                significance.paired_delta(aucs[a], aucs[r]) | {"arm": a, "reference": r}
                for a, r in COMPARISONS
                if a in aucs and r in aucs
            ],
        }
    courier = {}  # the heads behind these runs only: seeds run for a courier arm
    seeds = {s for by_arm in runs.values() for arm in COURIER_ARMS for s in by_arm.get(arm, {})}
    for seed in sorted(seeds):
        metrics = work / "courier" / f"seed-{seed}" / COURIER_METRICS
        if metrics.exists():
            courier[metrics.parent.name] = json.loads(metrics.read_text())
    return {"command": command, "models": models, "courier": courier}


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# COURIER on the leak-free split: paired test AUC", "", f"Command: `{summary['command']}`", ""]
    for model, result in summary["models"].items():
        lines += [
            f"## {model}",
            "",
            "| arm | seeds | test AUC (mean ± sd) | user AUC | epochs | wall s |",
            "|---|---|---|---|---|---|",
        ]
        for arm, row in result["arms"].items():
            auc = np.array(row["auc"])
            sd = auc.std(ddof=1) if len(auc) > 1 else float("nan")
            lines.append(
                f"| {arm} | {len(auc)} | {auc.mean():.4f} ± {sd:.4f} | {np.mean(row['user_auc']):.4f} | "
                f"{np.mean(row['epochs_run']):.1f} | {np.mean(row['wall_s']):.0f} |"
            )
        lines += ["", *significance.comparison_table(result["comparisons"])]
        lines.append("")
    if summary["courier"]:
        lines += ["## The COURIER heads (intrinsic metric, validation)", ""]
        for seed, metrics in summary["courier"].items():
            recall = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics["recall_at_k"].items())
            lines.append(
                f"- {seed}: recall@{metrics['k']} {recall}; best epoch {metrics['best_epoch']}, "
                f"{metrics['seconds']:.0f} s"
            )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an imported and embedded dataset directory")
    parser.add_argument("--work", type=Path, required=True, help="runs go to WORK/MODEL/ARM/seed-K")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 1..N per arm")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "courier-movielens")
    parser.add_argument(
        "--ledger", type=Path, default=None, help="restore finished runs from here first, save new ones here"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    command = "python -m benchmarks.courier " + shlex.join(sys.argv[1:] if argv is None else argv)
    seeds = list(range(1, args.seeds + 1))
    save = ledger.attach(LEDGER, args.ledger, args.work, args.data)
    runs = run_arms(args.data, load_config(args.config), args.work, seeds, args.arms, args.models, save)
    summary = summarise(runs, args.work, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
