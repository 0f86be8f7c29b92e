"""Reproduce the paper's experiments (Tables 2-5, Figures 4-6) on MovieLens-100k with posters and plot texts.

    marn data import movielens --src ../shared/datasets/movielens-100k \\
        --media ../shared/datasets/movielens-100k-media --out DATA
    marn embed --data DATA --weights ../shared/models/mobilenet_v2-b0353104.pth   # the paper used VGG16
    python -m benchmarks.paper run --data DATA --work WORK       # resumable: finished runs are kept
    python -m benchmarks.paper report --data DATA --work WORK    # tables, figures, results JSON

Stages of ``run``, each skipped when its outputs exist (stop it any time and run it again: a training run
stopped half way resumes after its last finished epoch, ``train_one``):
1. **tune**: Ray Tune searches lambda0 on the validation split separately for each adversarial variant
   (ADV, DDMA, MARN, and a switch row that changes what lambda means; ``WORK/tune/ROW/tune.json``); each
   adversarial row trains with its own variant's best (the other switch rows with MARN's). The learning
   rate is the paper's 0.1 for every model.
2. **grid**: every model of Tables 2 and 3 (the 17 registered models) and the switch rows of MARN's
   adversary (``SWITCH_ROWS``: MARN with one ModelConfig switch flipped) x ``--seeds``, as Ray tasks of one
   CPU each (``WORK/runs/ROW/seed-K``). Each run trains with early stopping on validation AUC and is
   scored once on test (``metrics.json``, with the adversary's per-epoch instrumentation), and keeps its
   per-step losses (``curves.json``) and weights (``model.pt``). DeepCTR-Torch's DIN and DIEN run last, the
   same way, as outside references.
3. **cold**: Table 5 needs items unseen in training, which MovieLens' time split hardly has (3 test
   items). A share of the items is held out: their samples are dropped from train and valid, they are
   cut out of train and valid histories, and they are held out of the statistics too (their counts come
   from their test clicks alone, so before those they are 0, as a new item's are); base_ids and MARN are
   trained on that and ranked on the test users who clicked a held-out item (``WORK/cold/MODEL/seed-K``).
4. **batch32**: a side experiment at the paper's batch size, 32, for MARN and DIN (``BATCH_SIDE_ROWS``), with
   everything else as in the grid (``WORK/batch32/ROW/seed-K``, ``--side-batch-seeds`` seeds; 0 skips it).
   The grid runs at 1024 to fit 2 cores; this shows what that choice changes.

The test split is read only by ``save_run`` after a run's epochs are chosen on validation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks import ledger
from benchmarks.paper_report.markdown import mean_sd
from benchmarks.paper_report.report import write_report
from benchmarks.paper_report.runs import (
    BATCH_SIDE_ROWS,
    FIXED_LAMBDA0,
    REFERENCES,
    SIDE_BATCH_SIZE,
    SWITCH_ROWS,
    TABLE2,
    TABLE3,
)
from marn.config import Config, load_config
from marn.data.files import write_atomic, write_text_atomic
from marn.data.schema import Dataset, read_dataset
from marn.data.stats import earliest_time, item_stat_table
from marn.data.tensors import PAD, EncodedSamples, stat_codes
from marn.models import build_model, model_names
from marn.models.marn import VARIANTS
from marn.train import (
    METRICS,
    EpochResult,
    FitState,
    RunInputs,
    fit,
    prepare_inputs,
    save_run,
    seed_everything,
)
from marn.tune import TUNE_FILE, result_overrides, tune_hyperparameters

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "paper-movielens.yaml"
COLD_MODELS = ("base_ids", "marn")  # the paper's Table 5 rows
CURVES = "curves.json"
RESUME = "resume.pt"  # a run's state after its last finished epoch (train_one)
TIMING = "timing.json"  # wall seconds of every stage and invocation, summed for the results' wall_s
TICK_S = 60.0  # how often a running stage adds its seconds to TIMING
UNFINISHED = 3  # run's exit status when a budget left runs for the next invocation (no report yet)
COMMANDS = "command.json"  # every invocation of ``run``, with its commit
# What the grid's ledger keeps (benchmarks/ledger.py): the report reads nothing else.
LEDGER = ledger.Layout(
    finished=f"*/*/seed-*/{METRICS}",
    kept=("tune/*/tune.json", "cold/held_out.json"),
    beside=((f"runs/marn/seed-1/{METRICS}", ("model.pt", CURVES)),),  # Figures 4-6 read MARN seed 1
    running=(TIMING, COMMANDS),
)
# Rough seconds per epoch on one core at configs/paper-movielens.yaml, for a model no finished run has
# measured yet (``expected_run_seconds``); an unknown model counts as slow.
EPOCH_COST = {"lr": 1, "fm": 3, "youtubenet": 22, "base_ids": 18, "base_image": 25}
TYPICAL_EPOCHS = 18  # epochs a run takes to stop early, for the same rough estimate


def paper_models() -> tuple[str, ...]:
    """Table 2 then Table 3, each model once: the 17 registered models."""
    names = tuple(dict.fromkeys(TABLE2 + TABLE3))
    missing = sorted(set(model_names()) - set(names))
    if missing:  # a newly registered model must be placed in a table, not silently left out
        raise ValueError(f"registered models missing from the paper's tables: {missing}")
    return names


def grid_rows(selected: list[str] | None = None) -> tuple[str, ...]:
    """The paper's models, then the switch rows; ``selected`` keeps those named (an unknown name fails)."""
    rows = paper_models() + tuple(SWITCH_ROWS)
    unknown = sorted(set(selected or ()) - set(rows))
    if unknown:
        raise ValueError(f"unknown models {unknown}; the grid's rows: {', '.join(rows)}")
    return tuple(r for r in rows if not selected or r in selected)


def run_dir(work: Path, experiment: str, model: str, seed: int) -> Path:
    return work / experiment / model / f"seed-{seed}"


def row_config(cfg: Config, row: str) -> Config:
    """``cfg`` training ``row``: a registered model (or a reference), or a switch row's model and switches."""
    model, switches = SWITCH_ROWS.get(row, (row, {}))
    return cfg.with_overrides({"train.model": model, **{f"model.{k}": v for k, v in switches.items()}})


def is_adversarial(cfg: Config) -> bool:
    """Whether the row's model has a discriminator, so that lambda0 means something to it."""
    variant = VARIANTS.get(cfg.train.model)
    return variant is not None and variant.adversarial != "none"


def lambda0_source(row: str) -> str:
    """The row whose lambda0 search ``row`` trains with: ADV, DDMA and MARN each their own; a switch row
    MARN's, unless it changes what lambda means (``lambda_role``), which is searched for itself."""
    model, switches = SWITCH_ROWS.get(row, (row, {}))
    return row if "lambda_role" in switches else model


# --------------------------------------------------------------------------------------------------------
# Stage 1: lambda0 by Ray Tune on validation, per adversarial variant
# --------------------------------------------------------------------------------------------------------


def tuned_values(
    dataset: Dataset, cfg: Config, work: Path, row: str, on_searched: Callable[[], object] = lambda: None
) -> dict[str, Any]:
    """The overrides of ``WORK/tune/ROW/tune.json`` for ``cfg`` (``row_config``'s): the best lambda0 and the
    search's schedule horizon (lr is the grid's own), searching first when it does not exist yet (then
    ``on_searched()``). A search of another model config or learning rate is refused, not reused."""
    path = work / "tune" / row / TUNE_FILE
    cfg = cfg.with_overrides({"tune.model": cfg.train.model})
    if not path.exists():
        print(
            f"[tune] Ray Tune: {cfg.tune.trials} trials of {row} over lambda0 "
            f"{cfg.tune.lambda0_range}, validation AUC only",
            flush=True,
        )
        with _timed(work, "tune"):
            tune_hyperparameters(dataset, cfg, path.parent)
        # Ray Tune leaves its own SIGINT handler behind, which would swallow Ctrl+C during the grid.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        on_searched()
    report = json.loads(path.read_text())
    if report["search"]["lr_range"][0] != cfg.train.lr or report["search"]["lr_range"][1] != cfg.train.lr:
        raise ValueError(
            f"{path} searched lr {report['search']['lr_range']}; the grid trains at {cfg.train.lr}"
        )
    overrides = result_overrides(report, cfg, f"{path} (delete it to search again)")
    print(
        f"[tune] {row}: lambda0 = {report['best']['lambda0']:.4g} (validation AUC "
        f"{report['best_valid_auc']:.4f}, {len(report['trials'])} trials)",
        flush=True,
    )
    return overrides


def tuned_configs(
    dataset: Dataset,
    cfg: Config,
    rows: list[str],
    work: Path,
    on_searched: Callable[[], object] = lambda: None,
) -> dict[str, Config]:
    """Each row's config with its variant's tuned lambda0 and schedule horizon (searched first where
    missing, ``on_searched()`` after each search), or a ``FIXED_LAMBDA0`` row's own lambda0 with its
    variant's horizon; rows without a discriminator keep the configured values, as lambda0 means nothing to
    them."""
    configs = {row: row_config(cfg, row) for row in rows}
    sources = dict.fromkeys(lambda0_source(r) for r in rows if is_adversarial(configs[r]))
    tuned = {
        source: tuned_values(dataset, row_config(cfg, source), work, source, on_searched)
        for source in sources
    }
    fixed = {row: {"model.lambda0": value} for row, value in FIXED_LAMBDA0.items()}
    return {
        row: c.with_overrides({**tuned[lambda0_source(row)], **fixed.get(row, {})})
        if is_adversarial(c)
        else c
        for row, c in configs.items()
    }


# --------------------------------------------------------------------------------------------------------
# Stage 3's data: items held out of training
# --------------------------------------------------------------------------------------------------------


def cold_items(n_items: int, share: float, seed: int) -> torch.Tensor:
    """(C,) sorted item codes (1..n_items) held out of training: a seeded uniform draw of ``share``."""
    if not 0 < share < 1:
        raise ValueError(f"the held-out share must lie in (0, 1), got {share}")
    count = max(1, round(share * n_items))
    generator = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_items, generator=generator)[:count] + 1).values  # codes start at 1


def without_items(data: EncodedSamples, held_out: torch.Tensor) -> EncodedSamples:
    """Drop the samples whose candidate is held out and cut held-out items out of every history.

    Histories stay left-aligned: the kept behaviours move left in order and the rest becomes padding.
    """
    t = data.tensors
    keep = ~torch.isin(t["item"], held_out)  # (N,)
    hist = t["hist_items"][keep]  # (N', L)
    width = hist.shape[1]
    real = torch.arange(width)[None, :] < t["hist_len"][keep][:, None]  # (N', L)
    kept = real & ~torch.isin(hist, held_out)  # (N', L)
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)  # kept columns first, in order
    tensors = {
        "item": t["item"][keep],
        "item_stats": t["item_stats"][keep],
        "label": t["label"][keep],
        "hist_len": kept.sum(1),
    }
    rows = torch.arange(len(order))[:, None]  # (N', 1)
    still = torch.gather(kept, 1, order)  # (N', L) a kept behaviour at this column after the move
    for name in ("hist_items", "hist_stats", "hist_behavior", "hist_gap"):
        moved = t[name][keep][rows, order]  # (N', L, ...)
        mask = still.view(*still.shape, *[1] * (moved.dim() - 2))
        tensors[name] = torch.where(mask, moved, torch.full_like(moved, PAD))
    return EncodedSamples(data.users[keep.numpy()], data.times[keep.numpy()], tensors)


def cold_statistics(dataset: Dataset, inputs: RunInputs, held_out: torch.Tensor) -> pd.DataFrame:
    """The statistic table with the held-out items held out of it: their counts come from the users' test
    clicks alone (each user's last event, the only events of theirs the experiment keeps), so they are 0
    until a held-out item's first test click, as a new item's are. Other items' rows are unchanged."""
    held_ids = set(np.asarray(inputs.catalog.items.values, dtype=object)[held_out.numpy() - 1])
    events = dataset.events
    order = events.assign(_row=np.arange(len(events))).sort_values(["user_id", "ts", "_row"], kind="stable")
    last = np.zeros(len(events), dtype=bool)
    last[order.groupby("user_id", sort=False).tail(1)["_row"].to_numpy()] = True  # each user's test event
    kept = events[~events["item_id"].astype(str).isin(held_ids).to_numpy() | last]
    cold = item_stat_table(replace(dataset, events=kept, item_stats=None), earliest_time(dataset))
    table = inputs.item_stats
    return pd.concat(
        [table[~table["item_id"].isin(held_ids)], cold[cold["item_id"].isin(held_ids)]], ignore_index=True
    ).sort_values(["item_id", "ts"], kind="stable", ignore_index=True)


def with_statistics_of(data: EncodedSamples, items: torch.Tensor, inputs: RunInputs) -> EncodedSamples:
    """``data`` whose candidates and history entries among ``items`` (codes) read their statistics from
    ``inputs.item_stats`` as of each sample's time; every other entry is left as it is."""
    t = dict(data.tensors)
    ids = np.asarray(("", *inputs.catalog.items.values), dtype=object)  # code -> id
    statistics = inputs.features.statistics
    for column, stats in (("item", "item_stats"), ("hist_items", "hist_stats")):
        codes = t[column]
        where = torch.isin(codes, items)  # (N,) or (N, L)
        if column == "hist_items":
            where &= torch.arange(codes.shape[1])[None, :] < t["hist_len"][:, None]
        rows = torch.nonzero(where, as_tuple=True)
        times = data.times[rows[0].numpy()]
        values = stat_codes(inputs.item_stats, ids[codes[rows].numpy()], times, statistics)
        t[stats] = t[stats].clone()
        t[stats][rows] = torch.from_numpy(values)
    return EncodedSamples(data.users, data.times, t)


def cold_inputs(
    dataset: Dataset, inputs: RunInputs, share: float, seed: int
) -> tuple[RunInputs, torch.Tensor]:
    """Inputs whose train and valid splits never mention the held-out items and whose statistics never
    count their events outside the test clicks; test keeps its samples, with those statistics."""
    held_out = cold_items(len(inputs.catalog.items.values), share, seed)  # len(Vocab) counts PAD too
    train, valid = (without_items(split, held_out) for split in (inputs.train, inputs.valid))
    cold = replace(inputs, train=train, valid=valid, item_stats=cold_statistics(dataset, inputs, held_out))
    return replace(cold, test=with_statistics_of(inputs.test, held_out, cold)), held_out


# --------------------------------------------------------------------------------------------------------
# One training run (a Ray task)
# --------------------------------------------------------------------------------------------------------


def train_one(inputs: RunInputs, cfg: Config, row: str, seed: int, out_dir: str) -> dict[str, Any]:
    """Train ``row`` (``cfg`` is its ``row_config``) with ``seed``; write metrics.json, curves.json and
    model.pt into ``out_dir``.

    Resumable: after every epoch the run's whole state (``FitState``, the per-step losses so far and the
    wall seconds spent) goes to ``out_dir/resume.pt``; a run that finds one carries on from it, exactly as
    the uninterrupted run would have (same batches, dropout masks and schedule), so a grid stopped half way
    loses at most the epoch in progress. ``metrics.json`` records the epochs it resumed after.
    """
    torch.set_num_threads(1)  # one core per task
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = cfg.with_overrides({"train.seed": seed})
    model_name = run_cfg.train.model
    seed_everything(seed)
    if model_name in REFERENCES:
        from benchmarks.deepctr_models import build_deepctr

        model = build_deepctr(
            model_name, inputs.catalog, inputs.features, run_cfg.model, cfg.samples.max_history
        )
    else:
        model = build_model(model_name, inputs.catalog, inputs.features, run_cfg.model)
    saved = read_resume(out / RESUME)
    curve: list[dict[str, float]] = list(saved.curve) if saved else []
    earlier_wall = saved.wall_s if saved else 0.0
    resumed_after = [*saved.resumed_after, saved.fit.epoch] if saved else []
    if saved:
        print(f"[resume] {row} seed {seed}: after epoch {saved.fit.epoch} ({out / RESUME})", flush=True)

    def checkpoint(result: EpochResult, state: FitState) -> None:
        wall = earlier_wall + time.perf_counter() - started
        write_resume(out / RESUME, ResumeState(state, tuple(curve), wall, tuple(resumed_after)))

    best_state, history = fit(
        model,
        inputs.train,
        inputs.valid,
        run_cfg.train,
        show_progress=False,
        resume=saved.fit if saved else None,
        on_epoch=checkpoint,
        on_step=lambda step, losses: curve.append({"step": step, **losses}),
    )
    write_text_atomic(
        out / CURVES,
        json.dumps({"steps_per_epoch": -(-len(inputs.train) // run_cfg.train.batch_size), "steps": curve})
        + "\n",
    )
    result = save_run(  # metrics.json last: it marks the run done
        model,
        best_state,
        history,
        inputs,
        run_cfg,
        out,
        started - earlier_wall,  # wall_s counts every attempt's epochs
        extra={
            "row": row,
            "switches": SWITCH_ROWS.get(row, (model_name, {}))[1],
            "lambda0": run_cfg.model.lambda0 if is_adversarial(run_cfg) else None,
            "threads": torch.get_num_threads(),
            "resumed_after_epochs": resumed_after,
            "commit": git_commit(),  # the code that finished it: a ledger's runs span sessions
        },
    )
    (out / RESUME).unlink(missing_ok=True)
    m = result.metrics
    return {"auc": m["auc"], "user_auc": m["user_auc"], "epochs": m["epochs_run"], "wall_s": m["wall_s"]}


@dataclass(frozen=True)
class ResumeState:
    """A run stopped after ``fit.epoch`` epochs: where ``train_one`` carries on from."""

    fit: FitState
    curve: tuple[dict[str, float], ...]  # the per-step losses of the epochs done
    wall_s: float  # seconds spent on them, over every attempt
    resumed_after: tuple[int, ...]  # the epochs earlier attempts resumed after


def write_resume(path: Path, state: ResumeState) -> None:
    payload = {
        "fit": state.fit.to_dict(),
        "curve": list(state.curve),
        "wall_s": state.wall_s,
        "resumed_after": list(state.resumed_after),
    }
    write_atomic(path, lambda tmp: torch.save(payload, tmp))  # a stop while writing keeps the last one whole


def read_resume(path: Path) -> ResumeState | None:
    """The saved state, or None when there is none. A file that does not load is an error, not a fresh
    start: silently retraining would hide that the run was damaged (delete it to start over)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        return ResumeState(
            FitState.from_dict(saved["fit"]),
            tuple(saved["curve"]),
            float(saved["wall_s"]),
            tuple(int(e) for e in saved["resumed_after"]),
        )
    except Exception as err:
        raise ValueError(f"{path}: not a readable resume state ({err}); delete it to retrain") from err


def measured_run_seconds(work: Path) -> dict[tuple[str, str], float]:
    """Median wall seconds of the finished runs under WORK, per (experiment, trained model): a switch row
    counts as the model it trains."""
    walls: dict[tuple[str, str], list[float]] = {}
    for path in work.glob(f"*/*/seed-*/{METRICS}"):
        try:
            metrics = json.loads(path.read_text())
            walls.setdefault((path.parents[2].name, metrics["model"]), []).append(float(metrics["wall_s"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a run being written or from an older layout: no estimate from it
    return {key: float(np.median(values)) for key, values in walls.items()}


# Stages whose runs cost what the grid's runs of the same model cost (same batch size and budget); a
# batch-32 run does not, and is not estimated from them.
LIKE_THE_GRID = ("runs", "cold")


def expected_run_seconds(
    measured: dict[tuple[str, str], float], experiment: str, row: str, cfg: Config
) -> float | None:
    """A pending run's expected wall seconds: the same stage's finished runs of its model, else (in a stage
    like the grid) the grid's, else ``EPOCH_COST``'s rough figure; None when nothing comparable is known.
    Orders the queue (longest first, so that both cores stay busy to the end) and makes the time left that
    the progress lines show."""
    model = cfg.train.model
    found = measured.get((experiment, model))
    if found is None and experiment in LIKE_THE_GRID:
        found = measured.get(("runs", model), EPOCH_COST.get(row, 60) * TYPICAL_EPOCHS)
    return found


def time_left(expected: list[float | None], cores: int) -> str:
    """ "about N min left" for runs of these expected seconds at one per core (runs in flight counted
    whole), with those of unknown length named apart."""
    known = [e for e in expected if e is not None]
    text = f"about {sum(known) / min(cores, max(len(known), 1)) / 60:.0f} min left"
    unknown = len(expected) - len(known)
    return text + (f" + {unknown} runs of unknown length" if unknown else "")


def run_experiment(
    experiment: str,
    inputs: RunInputs,
    configs: dict[str, Config],
    seeds: list[int],
    work: Path,
    on_finished: Callable[[], object] = lambda: None,
    deadline: float | None = None,
) -> tuple[list[str], int]:
    """Train every (row, seed) not yet done, one per core on Ray (``configs``: each row's config, all with
    the same ``ray`` section); ``on_finished()`` after each run that finishes. With a ``deadline``
    (``time.time()`` seconds) a run starts only when it is expected to end before it (``next_run``); the
    rest is left for the next invocation. Returns the failures' descriptions and the number of runs left."""
    import ray

    from marn.ray_runtime import ray_session

    models = list(configs)
    todo = [(m, s) for m in models for s in seeds if not (run_dir(work, experiment, m, s) / METRICS).exists()]
    done = len(models) * len(seeds) - len(todo)
    print(
        f"[{experiment}] {len(models)} models x {len(seeds)} seeds: {done} done, {len(todo)} to train",
        flush=True,
    )
    if not todo:
        return [], 0
    expected: dict[tuple[str, int], float | None] = {}

    def estimate(jobs: list[tuple[str, int]]) -> None:
        """Expected seconds of ``jobs`` from the runs finished so far; ``jobs`` sorted longest first (an
        unknown length counts as longest): fewer idle cores at the end."""
        measured = measured_run_seconds(work)
        expected.update(
            {job: expected_run_seconds(measured, experiment, job[0], configs[job[0]]) for job in jobs}
        )
        jobs.sort(key=lambda job: -(expected[job] if expected[job] is not None else float("inf")))

    estimate(todo)
    parallel = max(1, int(configs[models[0]].ray.num_cpus or os.cpu_count() or 1))  # one run per core
    failures: list[str] = []
    started = time.perf_counter()
    with _timed(work, experiment), ray_session(configs[models[0]].ray):
        remote = ray.remote(num_cpus=1, max_retries=0)(_guarded_train_one)
        shared = ray.put(inputs)  # the features and encoded splits go to the object store once
        queue, pending = list(todo), {}

        def start_runs() -> None:  # fill the free cores, longest first, with what fits the deadline
            while len(pending) < parallel and (job := next_run(queue, expected, time.time(), deadline)):
                queue.remove(job)
                m, s = job
                pending[remote.remote(shared, configs[m], m, s, str(run_dir(work, experiment, m, s)))] = job

        start_runs()
        finished = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            model, seed = pending.pop(ready[0])
            outcome = ray.get(ready[0])
            finished += 1
            elapsed = time.perf_counter() - started
            del expected[(model, seed)]
            left = time_left(list(expected.values()), parallel)
            if "error" in outcome:
                failures.append(f"{experiment}/{model}/seed-{seed}: {outcome['error']}")
                print(
                    f"[{experiment} {finished}/{len(todo)}] {model} seed {seed} FAILED: {outcome['error']}",
                    flush=True,
                )
                start_runs()
                continue
            print(
                f"[{experiment} {finished}/{len(todo)}] {model:>14} seed {seed}: "
                f"test AUC {outcome['auc']:.4f} "
                f"user AUC {outcome['user_auc']:.4f}, {outcome['epochs']} epochs, {outcome['wall_s']:.0f} s "
                f"(elapsed {elapsed / 60:.1f} min, {left})",
                flush=True,
            )
            on_finished()
            estimate(queue)  # a first finished run of a model replaces its rough figure
            start_runs()
    if queue:
        print(
            f"[{experiment}] {len(queue)} runs left for the next invocation: none is expected to end before "
            f"the deadline ({time_left([expected[job] for job in queue], parallel)})",
            flush=True,
        )
    return failures, len(queue)


def next_run(
    queue: list[tuple[str, int]],
    expected: dict[tuple[str, int], float | None],
    now: float,
    deadline: float | None,
) -> tuple[str, int] | None:
    """The first run of ``queue`` (longest first) that is expected to end by ``deadline``; without a
    deadline the first one. A run of unknown length never fits a deadline. None when nothing fits."""
    for job in queue:
        seconds = expected[job]
        if deadline is None or (seconds is not None and now + seconds <= deadline):
            return job
    return None


def _guarded_train_one(inputs: RunInputs, cfg: Config, model: str, seed: int, out_dir: str) -> dict[str, Any]:
    """``train_one`` whose failure is reported as a value, so one broken model does not stop the grid."""
    try:
        return train_one(inputs, cfg, model, seed, out_dir)
    except Exception as err:
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}


# --------------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    deadline = time.time() + 60 * args.budget_min if args.budget_min else None
    cfg = load_config(args.config)
    dataset = read_dataset(args.data)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    # before anything else: finished runs and searches are not done again
    save = ledger.attach(LEDGER, args.ledger, work, args.data)
    _record_invocation(work, args)

    rows = list(grid_rows(args.models))
    cold_rows = [] if args.no_cold else list(COLD_MODELS)
    side_rows = list(BATCH_SIDE_ROWS) if args.side_batch_seeds else []
    configs = tuned_configs(dataset, cfg, list(dict.fromkeys(rows + cold_rows + side_rows)), work, save)
    inputs = prepare_inputs(dataset, cfg)
    seeds = list(range(1, args.seeds + 1))
    stages = [run_experiment("runs", inputs, {r: configs[r] for r in rows}, seeds, work, save, deadline)]
    if cold_rows:
        held_inputs, held_out = cold_inputs(dataset, inputs, args.cold_share, args.cold_seed)
        _write_json(
            work / "cold" / "held_out.json",
            {"share": args.cold_share, "seed": args.cold_seed, "items": held_out.tolist()},
        )
        stages += [
            run_experiment(
                "cold", held_inputs, {r: configs[r] for r in cold_rows}, seeds, work, save, deadline
            )
        ]
    if not args.no_references:  # after the paper's own grid: it comes first when time is short
        references = {r: row_config(cfg, r) for r in REFERENCES}
        stages += [run_experiment("runs", inputs, references, seeds, work, save, deadline)]
    if args.side_batch_seeds:  # last: the costliest runs per sample (32x the optimiser steps)
        side = {r: configs[r].with_overrides({"train.batch_size": SIDE_BATCH_SIZE}) for r in side_rows}
        stages += [
            run_experiment("batch32", inputs, side, seeds[: args.side_batch_seeds], work, save, deadline)
        ]
    failures = [failure for stage_failures, _ in stages for failure in stage_failures]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    if failures:
        return 1
    left = sum(n for _, n in stages)
    if left:
        print(f"{left} runs left for the next invocation (--budget-min): the grid is unfinished", flush=True)
        return UNFINISHED
    return 0


@dataclass(frozen=True)
class RowStatus:
    experiment: str
    row: str
    finished: int  # seeds with a metrics.json
    seeds: int  # seeds the stage trains
    in_progress: dict[int, int]  # seed -> its last finished epoch (a resume.pt, no metrics.json yet)
    auc: tuple[float, ...]  # the finished seeds' test AUC
    left_s: list[float | None]  # expected wall seconds of each unfinished seed (None: unknown)


def grid_status(work: Path, cfg: Config, seeds: int, side_batch_seeds: int) -> list[RowStatus]:
    """Where a grid stands, read from WORK alone (no data, no Ray, nothing written): every stage's rows as
    ``run`` with these settings trains them, what is finished, what a stop left half done, and the
    expected time of the rest (``expected_run_seconds``)."""
    stages = [
        ("runs", grid_rows(), seeds),
        ("cold", COLD_MODELS, seeds),
        ("runs", REFERENCES, seeds),
        ("batch32", BATCH_SIDE_ROWS, side_batch_seeds),
    ]
    measured = measured_run_seconds(work)
    out = []
    for experiment, rows, n in stages:
        for row in rows if n else ():
            aucs, in_progress, left = [], {}, []
            for seed in range(1, n + 1):
                path = run_dir(work, experiment, row, seed)
                if (path / METRICS).exists():
                    aucs.append(float(json.loads((path / METRICS).read_text())["auc"]))
                    continue
                left.append(expected_run_seconds(measured, experiment, row, row_config(cfg, row)))
                saved = read_resume(path / RESUME)
                if saved is not None:
                    in_progress[seed] = saved.fit.epoch
            out.append(RowStatus(experiment, row, len(aucs), n, in_progress, tuple(aucs), left))
    return out


def print_status(statuses: list[RowStatus], cores: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="paper grid", title_justify="left")
    for header in (
        "stage",
        "row",
        "seeds done",
        "in progress (epochs done)",
        "test AUC so far",
        "left, 1 core",
    ):
        table.add_column(header, justify="left" if header in ("stage", "row") else "right")
    for s in statuses:
        auc = mean_sd(s.auc) if s.auc else ""
        running = ", ".join(f"seed {seed}: {epoch}" for seed, epoch in sorted(s.in_progress.items()))
        known = [e for e in s.left_s if e is not None]
        left = " + ".join([f"{sum(known) / 60:.0f} min"] * bool(known) + ["?"] * (len(known) < len(s.left_s)))
        table.add_row(s.experiment, s.row, f"{s.finished}/{s.seeds}", running, auc, left)
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log keeps every column whole
    console.print(table)
    done, total = sum(s.finished for s in statuses), sum(s.seeds for s in statuses)
    console.print(
        f"{done} of {total} runs finished; {time_left([e for s in statuses for e in s.left_s], cores)} at "
        f"one run per core ({cores} cores; from the finished runs of each model, runs in progress counted "
        "whole)"
    )


def _record_invocation(work: Path, args: argparse.Namespace) -> None:
    """Append this ``run`` to ``WORK/command.json``: the report names every command and the code's commit."""
    path = work / COMMANDS
    invocations = json.loads(path.read_text())["invocations"] if path.exists() else []
    invocations.append(
        {
            "command": _command(args),
            "config": str(args.config),
            "commit": git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    _write_json(path, {"invocations": invocations})


def _command(args: argparse.Namespace) -> str:
    return " ".join(["python", "-m", "benchmarks.paper", *sys.argv[1:]])


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")  # never half-written, even when stopped


class _timed:
    """Adds the wall seconds of a stage to ``WORK/timing.json`` as they pass: every ``TICK_S`` from a
    background thread and at the end, so a process killed outright (SIGKILL, a machine taken back) loses at
    most the last tick's worth, not the whole stage."""

    def __init__(self, work: Path, stage: str):
        self.path, self.stage = work / TIMING, stage
        self.lock, self.stopped = threading.Lock(), threading.Event()

    def __enter__(self) -> None:
        self.last = time.perf_counter()
        self.ticker = threading.Thread(
            target=self._tick_until_stopped, name=f"timing-{self.stage}", daemon=True
        )
        self.ticker.start()

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.ticker.join()
        self.tick()

    def _tick_until_stopped(self) -> None:
        while not self.stopped.wait(TICK_S):
            self.tick()

    def tick(self) -> None:
        with self.lock:
            now = time.perf_counter()
            timing = json.loads(self.path.read_text()) if self.path.exists() else {}
            timing[self.stage] = timing.get(self.stage, 0.0) + now - self.last
            _write_json(self.path, timing)
            self.last = now


def hardware() -> str:
    cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "CUDA GPU" if torch.cuda.is_available() else "no GPU"
    return f"{cores} cores ({cpu}), {memory:.0f} GiB RAM, {gpu}; torch {torch.__version__}, 1 thread per run"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser(
        "run",
        help="tune lambda0 per adversarial variant, train the grid and the held-out-items runs (resumable)",
    )
    report_p = sub.add_parser("report", help="tables, figures and the results JSON from finished runs")
    status_p = sub.add_parser(
        "status", help="what is finished, in progress and left, from WORK alone (safe while `run` runs)"
    )
    save_p = sub.add_parser(
        "save",
        help="copy WORK's finished runs and searches into a ledger (what `run --ledger` does after each run)",
    )
    save_p.add_argument("--data", type=Path, required=True)
    save_p.add_argument("--work", type=Path, required=True)
    save_p.add_argument("--ledger", type=Path, required=True)
    status_p.add_argument("--work", type=Path, required=True)
    status_p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    status_p.add_argument("--seeds", type=int, default=5)
    status_p.add_argument("--side-batch-seeds", type=int, default=2)
    for p in (run_p, report_p):
        p.add_argument("--data", type=Path, required=True, help="imported and embedded MovieLens directory")
        p.add_argument("--work", type=Path, required=True, help="runs, tune results and timings live here")
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        p.add_argument("--seeds", type=int, default=5, help="training seeds 1..N per model")
    run_p.add_argument(
        "--models", type=lambda s: s.split(","), default=None, help="a subset of the rows (default: all)"
    )
    run_p.add_argument(
        "--ledger",
        type=Path,
        default=None,
        help="restore finished runs from this directory first and save each new one there "
        "(benchmarks/ledger.py; the Makefile's `paper` uses benchmarks/results/paper-movielens-runs)",
    )
    run_p.add_argument(
        "--budget-min",
        type=float,
        default=None,
        help="start a training run only if it is expected to end within this many minutes of the start "
        "(from the finished runs of its model), so that a machine taken back at a known time loses no "
        "half-done run; the rest is left for the next invocation (runs of unknown length never start)",
    )
    run_p.add_argument("--no-references", action="store_true", help="skip DeepCTR-Torch's DIN and DIEN")
    run_p.add_argument("--no-cold", action="store_true", help="skip the held-out-items runs (Table 5)")
    run_p.add_argument("--cold-share", type=float, default=0.1, help="share of items held out of training")
    run_p.add_argument("--cold-seed", type=int, default=7)
    run_p.add_argument(
        "--side-batch-seeds",
        type=int,
        default=2,
        help=f"seeds of the batch-{SIDE_BATCH_SIZE} side experiment (0: skip it)",
    )
    report_p.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="paper-movielens.{json,md} and the figures go here",
    )
    args = parser.parse_args(argv)
    if args.command == "status":
        cfg = load_config(args.config)
        print_status(grid_status(args.work, cfg, args.seeds, args.side_batch_seeds), cfg.ray.num_cpus or 1)
        return 0
    if args.command == "save":
        copied = ledger.save(LEDGER, args.work, args.ledger, args.data)
        print(f"{len(copied)} files saved to {args.ledger}: {', '.join(map(str, copied)) or 'none new'}")
        return 0
    if args.command == "run" and not 0 <= args.side_batch_seeds <= args.seeds:
        parser.error(f"--side-batch-seeds must lie in [0, --seeds = {args.seeds}]")
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (mean, standard deviation and the t-test need them)")
    if args.command == "run":
        return run(args)
    write_report(args.data, args.work, args.config, args.out, args.seeds, hardware(), git_commit())
    return 0


if __name__ == "__main__":
    sys.exit(main())
