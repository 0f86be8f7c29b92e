"""FLIP end to end on one dataset: text cache -> pretraining on training rows -> one finetuning strategy."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from marn.config import Config, FlipConfig
from marn.data.files import write_atomic
from marn.data.samples import Samples
from marn.data.schema import Dataset
from marn.data.tensors import EncodedSamples
from marn.evaluate import ctr_metrics
from marn.flip.model import FlipJoint, FlipPretrainer, FlipTextTower, Projection, check_tower
from marn.flip.text import TextCache, TextEncoder, build_text_cache, load_minilm
from marn.models import CTRModel, build_model
from marn.progress import progress_bar
from marn.train import RunInputs, fit, predict, prepare_inputs, save_run, seed_everything

FLIP_METRICS = "flip_metrics.json"

logger = logging.getLogger(__name__)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads (``flip.threads``), then restore the caller's number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class FlipInputs:
    """A run's encoded splits (each with ``flip_user``, the user-segment code) and the text cache."""

    run: RunInputs
    cache: TextCache
    encode_s: float


def with_user_codes(data: EncodedSamples, cache: TextCache) -> EncodedSamples:
    return replace(data, tensors={**data.tensors, "flip_user": cache.user_codes(data.users)})


def prepare_flip_inputs(
    dataset: Dataset, cfg: Config, encoder: TextEncoder | None = None, samples: Samples | None = None
) -> FlipInputs:
    """The run's inputs (marn.train.prepare_inputs; ``samples`` built unless given) and every prompt
    segment encoded once (frozen)."""
    check_tower(cfg.flip.tower)
    inputs = prepare_inputs(dataset, cfg, samples=samples)
    started = time.perf_counter()
    encoder = encoder or load_minilm()
    flip = cfg.flip
    with torch_threads(flip.threads):
        cache = build_text_cache(
            dataset.items,
            dataset.users,
            inputs.catalog,
            encoder,
            flip.history_titles,
            flip.title_tokens,
            flip.field_tokens,
            flip.encode_batch_size,
            flip.user_fields,
        )
    splits = {name: with_user_codes(getattr(inputs, name), cache) for name in ("train", "valid", "test")}
    return FlipInputs(replace(inputs, **splits), cache, time.perf_counter() - started)


@dataclass(frozen=True)
class PretrainCheckpoint:
    """Where pretraining keeps its whole state after each epoch but the last (``path``), and the settings it
    must have been made with: a pretraining stopped half way carries on from its last finished epoch, as
    the uninterrupted one would have (same batches, masks and dropout)."""

    path: Path
    settings: str


def pretrain(
    tower: CTRModel,
    cache: TextCache,
    train: EncodedSamples,
    n_items: int,
    max_history: int,
    cfg: FlipConfig,
    show_progress: bool = True,
    checkpoint: PretrainCheckpoint | None = None,
) -> tuple[FlipPretrainer, list[dict[str, float | None]]]:
    """Align ``tower`` with the text side on the training rows only (AdamW; the encoder stays frozen).
    Labels are removed from the rows first: pretraining cannot read them. Returns the pretrainer (its
    ``tower`` is the aligned registry model) and the per-epoch mean losses and seconds; an epoch that took
    no step (no batch of 2 rows) has None for its losses, not a measured 0."""
    if not cfg.losses:
        raise ValueError("flip.losses is empty: nothing to pretrain with")
    train = replace(train, tensors={k: v for k, v in train.tensors.items() if k != "label"})  # unread: gone
    torch.manual_seed(cfg.seed)
    model = FlipPretrainer(tower, cache, n_items, max_history, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    shuffle, masks = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    generators = {"shuffle": shuffle, "masks": masks}
    groups, history = train.request_groups(), []
    if checkpoint is not None and checkpoint.path.exists():
        history = _resume_pretraining(checkpoint, model, optimizer, generators)
    steps = -(-len(train) // cfg.pretrain_batch_size)
    model.train()
    with progress_bar(enabled=show_progress) as bar:
        task = bar.add_task(
            "flip pretrain", total=cfg.pretrain_epochs * steps, completed=len(history) * steps
        )
        for epoch in range(len(history) + 1, cfg.pretrain_epochs + 1):
            started, sums, seen = time.perf_counter(), dict.fromkeys(cfg.losses, 0.0), 0
            for index in train.shuffled(shuffle, groups).split(cfg.pretrain_batch_size):
                if len(index) < 2:
                    continue  # ICL needs another row to contrast with
                losses = model.losses(train.batch(index), masks)
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                optimizer.step()
                for name, value in losses.items():
                    sums[name] += value.item() * len(index)
                seen += len(index)
                bar.update(task, advance=1, description=f"flip pretrain epoch {epoch}")
            if not seen:
                logger.warning("flip: pretraining epoch %d took no step: no batch had 2 rows", epoch)
            history.append(
                {"epoch": epoch, "seconds": time.perf_counter() - started}
                | {name: total / seen if seen else None for name, total in sums.items()}
            )
            if checkpoint is not None and epoch < cfg.pretrain_epochs:
                state = {
                    "settings": checkpoint.settings,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generators": {name: g.get_state() for name, g in generators.items()},
                    "rng": torch.get_rng_state(),  # dropout
                    "history": history,
                }
                write_atomic(checkpoint.path, lambda tmp, state=state: torch.save(state, tmp))
    model.eval()
    return model, history


def describe_epoch(epoch: dict[str, Any], losses: Sequence[str]) -> str:
    """One pretraining epoch of the history for a log line; "no step" where nothing was measured."""
    parts = [
        f"{name} {epoch[name]:.4f}" if epoch[name] is not None else f"{name} (no step)" for name in losses
    ]
    return f"pretraining epoch {epoch['epoch']}: {', '.join(parts)} ({epoch['seconds']:.1f} s)"


def _resume_pretraining(
    checkpoint: PretrainCheckpoint,
    model: FlipPretrainer,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> list[dict[str, float | None]]:
    """Load a checkpoint's state into the pretraining objects; return the finished epochs' history."""
    saved = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
    if saved["settings"] != checkpoint.settings:
        raise ValueError(f"{checkpoint.path} was pretrained with other settings; remove it or pick another")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for name, generator in generators.items():
        generator.set_state(saved["generators"][name])
    torch.set_rng_state(saved["rng"])
    return list(saved["history"])


def finetune_model(
    strategy: str, tower: CTRModel, pretrainer: FlipPretrainer | None, inputs: FlipInputs, cfg: Config
) -> CTRModel | FlipJoint:
    """The model a strategy trains: the tower itself ("id"), the text tower ("text") or both ("joint").
    ``pretrainer`` None: the text projection starts untrained (the no-pretraining rivals)."""
    if strategy == "id":
        return tower
    projection = (
        pretrainer.text_projection
        if pretrainer is not None
        else Projection(inputs.cache.dim, cfg.flip.projection_dim, cfg.flip.dropout)
    )
    run = inputs.run
    text = FlipTextTower(run.catalog, run.features, cfg.model, inputs.cache, projection)
    if strategy == "text":
        return text
    if strategy == "joint":
        return FlipJoint(tower, text)
    raise ValueError(f"unknown FLIP strategy {strategy!r}; expected id, text or joint")


def run_flip(
    dataset: Dataset,
    cfg: Config,
    out_dir: str | Path,
    inputs: FlipInputs | None = None,
    pretrained: bool = True,
    show_progress: bool = True,
    pretrain_store: Path | None = None,
) -> dict[str, Any]:
    """Pretrain (unless ``pretrained`` is False: the same tower from random init), finetune with
    ``cfg.flip.strategy`` (early stopping on validation AUC, marn.train.fit), score the test split once.

    Strategy "id" writes an ordinary registry run (``model.pt`` of ``cfg.flip.tower``, ``metrics.json``):
    it registers and serves as that model. Every strategy writes ``flip_metrics.json``. Runs on
    ``flip.threads`` torch threads. ``pretrain_store``: a file that keeps the pretrained weights, so the
    strategies of one seed share one pretraining (read when it exists and was made with the same settings,
    else written).
    """
    inputs = inputs or prepare_flip_inputs(dataset, cfg)
    with torch_threads(cfg.flip.threads):
        return _run_flip(cfg, Path(out_dir), inputs, pretrained, show_progress, pretrain_store)


def _run_flip(
    cfg: Config,
    out_dir: Path,
    inputs: FlipInputs,
    pretrained: bool,
    show_progress: bool,
    pretrain_store: Path | None,
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.with_overrides({"train.model": cfg.flip.tower})
    started = time.perf_counter()
    run = inputs.run
    seed_everything(cfg.train.seed)
    tower = build_model(cfg.flip.tower, run.catalog, run.features, cfg.model)
    pretrainer, pretrain_history, pretrain_s = None, [], 0.0
    if pretrained:
        n_items, max_history = len(run.catalog.items), cfg.samples.max_history
        settings = _pretrain_settings(cfg)
        if pretrain_store is not None and pretrain_store.exists():
            saved = torch.load(pretrain_store, map_location="cpu", weights_only=True)
            if saved["settings"] != settings:
                raise ValueError(
                    f"{pretrain_store} was pretrained with other settings; remove it or pick another"
                )
            pretrainer = FlipPretrainer(tower, inputs.cache, n_items, max_history, cfg.flip)
            pretrainer.load_state_dict(saved["state_dict"])
            pretrain_history, pretrain_s = saved["history"], saved["pretrain_s"]
        else:
            partial = None
            if pretrain_store is not None:  # the epochs so far beside it, until it is written
                pretrain_store.parent.mkdir(parents=True, exist_ok=True)
                partial = PretrainCheckpoint(
                    pretrain_store.with_name(pretrain_store.name + ".partial"), settings
                )
            pretrainer, pretrain_history = pretrain(
                tower, inputs.cache, run.train, n_items, max_history, cfg.flip, show_progress, partial
            )
            pretrain_s = sum(epoch["seconds"] for epoch in pretrain_history)  # every attempt's epochs
            if partial is not None:
                record = {"state_dict": pretrainer.state_dict(), "history": pretrain_history}
                record |= {"pretrain_s": pretrain_s, "settings": settings}
                write_atomic(pretrain_store, lambda tmp: torch.save(record, tmp))  # concurrent benchmark runs
                partial.path.unlink(missing_ok=True)
        pretrainer.eval()
        seed_everything(cfg.train.seed)  # finetuning starts alike whether pretrained here or read back
    model = finetune_model(cfg.flip.strategy, tower, pretrainer, inputs, cfg)
    clock = time.perf_counter()
    best_state, history = fit(model, run.train, run.valid, cfg.train, show_progress=show_progress)
    finetune_s = time.perf_counter() - clock
    summary = {
        "strategy": cfg.flip.strategy,
        "tower": cfg.flip.tower,
        "pretrained": pretrained,
        "losses": list(cfg.flip.losses) if pretrained else [],
        "pretrain_history": pretrain_history,
        "encode_s": inputs.encode_s,
        "pretrain_s": pretrain_s,
        "finetune_s": finetune_s,
        "segments": {"items": len(inputs.cache.item_segments), "users": len(inputs.cache.user_segments)},
    }
    if cfg.flip.strategy == "id":
        metrics = save_run(
            model, best_state, history, run, cfg, out_dir, started, extra={"flip": summary}
        ).metrics
    else:
        model.load_state_dict(best_state)
        best = max(history, key=lambda r: r.valid["auc"])
        test = run.test
        metrics = {
            **ctr_metrics(test.users, test.tensors["label"].numpy(), predict(model, test)),
            "model": f"flip_{cfg.flip.strategy}",
            "best_epoch": best.epoch,
            "valid": best.valid,
            "seed": cfg.train.seed,
            "wall_s": time.perf_counter() - started,
            "flip": summary,
        }
        torch.save({"strategy": cfg.flip.strategy, "state_dict": best_state}, out_dir / "flip.pt")
    flip_metrics = {key: metrics[key] for key in ("auc", "user_auc", "logloss", "valid", "best_epoch")}
    (out_dir / FLIP_METRICS).write_text(json.dumps({**flip_metrics, **summary}, indent=2) + "\n")
    return metrics


def _pretrain_settings(cfg: Config) -> str:
    """What a stored pretraining depends on: every setting but the finetuning strategy and schedule."""
    return json.dumps(
        {
            "flip": cfg.flip.model_dump(mode="json", exclude={"strategy"}),
            "model": cfg.model.model_dump(mode="json"),
            "samples": cfg.samples.model_dump(mode="json"),
            "train_seed": cfg.train.seed,  # the tower's initial weights
        },
        sort_keys=True,
    )
