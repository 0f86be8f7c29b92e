"""The training loop: plain torch, one process. Ray Train will run ``fit`` unchanged inside its workers.

``train_model`` is the whole job for one model on one dataset: DIN samples -> tensors -> ``fit`` with
early stopping on validation AUC -> the best checkpoint scored on test -> ``metrics.json``.
``prepare_inputs`` and ``save_run`` are its two ends, shared with the Ray Train driver (marn.distributed).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from marn.config import Config, ModelConfig, TrainConfig
from marn.curves import CURVE, write_training_curve
from marn.data.item_features import ItemFeatures, build_item_features, image_table
from marn.data.samples import Samples, build_samples
from marn.data.schema import Dataset
from marn.data.stats import StatDiscretizer, earliest_time, item_stat_table
from marn.data.tensors import EncodedSamples, ItemCatalog, encode_samples, fit_statistics, stat_codes
from marn.embed.courier import CourierHead
from marn.evaluate import auc_by_popularity, ctr_metrics, training_item_counts, unseen_item_recall
from marn.models import CTRModel, build_model
from marn.progress import progress_bar

CHECKPOINT = "model.pt"
METRICS = "metrics.json"


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float  # the CTR log loss, averaged over the epoch's samples
    valid: dict[str, float]
    seconds: float
    aux: dict[str, float] = field(default_factory=dict)  # auxiliary losses (adversarial, DIEN), epoch means

    def flat_metrics(self) -> dict[str, float]:
        """One flat dict for Ray's ``report``: validation metrics are ``valid_``-prefixed."""
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            **{f"valid_{name}": value for name, value in self.valid.items()},
            **self.aux,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class FitState:
    """Everything ``fit`` needs to carry on after ``epoch``: what Ray Train checkpoints and resumes from.

    With it a resumed run repeats the uninterrupted one exactly (same shuffles, dropout masks, schedule).
    """

    epoch: int  # epochs completed
    model_state: dict[str, torch.Tensor]  # the weights after ``epoch`` (unwrapped: no DDP "module." prefix)
    optimizer_state: dict[str, Any]  # AdaGrad's accumulators
    best_state: dict[str, torch.Tensor]  # the weights of the best validation AUC so far
    best_auc: float
    stale: int  # epochs since the best, for early stopping
    history: tuple[EpochResult, ...]
    shuffle_state: torch.Tensor  # the batch-order generator
    rng_state: torch.Tensor  # torch's global CPU generator (dropout)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, so it loads with ``torch.load(weights_only=True)``."""
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "history": [asdict(r) for r in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitState:
        missing = {f.name for f in fields(cls)} - data.keys()
        if missing:
            raise ValueError(f"not a saved FitState: missing {sorted(missing)}")
        return cls(**{**data, "history": tuple(EpochResult(**r) for r in data["history"])})


@dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, Any]
    checkpoint: Path
    metrics_path: Path


@dataclass(frozen=True)
class RunInputs:
    """What one training run needs besides the model: the catalogue, item features, encoded splits and
    the point-in-time statistic table (to score items a sample does not carry: Table 5's pool)."""

    catalog: ItemCatalog
    features: ItemFeatures
    train: EncodedSamples
    valid: EncodedSamples
    test: EncodedSamples
    item_stats: pd.DataFrame  # marn.data.stats.item_stat_table of the dataset


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def predict(model: CTRModel, data: EncodedSamples, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities for every sample, in order."""
    model.eval()
    device = _device(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            out.append(torch.sigmoid(model(_batch(data, index, device)).logits).cpu())
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.float32)


def evaluate_split(model: CTRModel, data: EncodedSamples) -> dict[str, float]:
    labels = data.tensors["label"].numpy()
    return ctr_metrics(data.users, labels, predict(model, data))


def fit(
    model: CTRModel | DistributedDataParallel,
    train: EncodedSamples,
    valid: EncodedSamples,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochResult, FitState], None] | None = None,
    show_progress: bool = True,
    resume: FitState | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[EpochResult]]:
    """Train with AdaGrad and early stopping on validation AUC; return the best state dict and history.

    ``model`` may be wrapped in DDP (Ray Train's ``prepare_model``): training steps go through the wrapper,
    validation and state dicts use the bare model. ``on_epoch`` sees each epoch's result and the state to
    resume from after it (Ray Train reports and checkpoints there); ``resume`` continues from such a state.
    ``on_step`` sees every optimiser step's number (1-based) and its losses: ``ctr`` and each auxiliary one
    (loss curves, paper Figure 6).
    """
    core = _unwrap(model)
    device = _device(core)  # a GPU under Ray Train with use_gpu; samples stay in CPU memory
    optimizer = torch.optim.Adagrad(
        model.parameters(), lr=cfg.lr, initial_accumulator_value=cfg.adagrad_initial_accumulator
    )
    bce = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(cfg.seed)
    best_auc, best_state, stale, history = -1.0, _copy_state(core), 0, []
    done = 0  # epochs completed before this call
    if resume is not None:
        core.load_state_dict(resume.model_state)
        optimizer.load_state_dict(resume.optimizer_state)
        shuffle.set_state(resume.shuffle_state)
        torch.set_rng_state(resume.rng_state)
        best_auc, best_state, stale = resume.best_auc, dict(resume.best_state), resume.stale
        history, done = list(resume.history), resume.epoch
        if stale >= cfg.patience:  # the saved epoch was the one that stopped the run
            return best_state, history
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    groups = train.request_groups()  # a positive and its negative share a history: batch them together
    total_steps, step = cfg.epochs * steps_per_epoch, done * steps_per_epoch
    # The lambda schedule's horizon: explicit, so a run of more epochs than its tuning keeps the tuned
    # schedule (p reaches 1 where it did there and stays there).
    horizon_steps = (cfg.lambda_horizon_epochs or cfg.epochs) * steps_per_epoch
    with progress_bar(enabled=show_progress) as bar:
        task = bar.add_task("train", total=total_steps, completed=step)
        for epoch in range(done + 1, cfg.epochs + 1):
            started, ctr_loss, seen = time.perf_counter(), 0.0, 0
            aux_sums: dict[str, float] = {}
            model.train()
            for index in train.shuffled(shuffle, groups).split(cfg.batch_size):
                batch = _batch(train, index, device)
                out = model(batch, progress=min(1.0, step / horizon_steps))  # p of the lambda schedule
                loss = bce(out.logits, batch["label"])
                step_ctr = loss.item()
                ctr_loss += step_ctr * len(index)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                optimizer.step()
                for name, value in out.aux.items():
                    aux_sums[name] = aux_sums.get(name, 0.0) + value.item() * len(index)
                seen += len(index)
                step += 1
                if on_step is not None:
                    on_step(step, {"ctr": step_ctr, **{name: v.item() for name, v in out.aux.items()}})
                bar.update(task, advance=1, description=f"epoch {epoch} loss {ctr_loss / seen:.4f}")
            _sync_buffers(model)
            valid_metrics = evaluate_split(core, valid)
            seen = max(seen, 1)
            result = EpochResult(
                epoch,
                ctr_loss / seen,
                valid_metrics,
                time.perf_counter() - started,
                {name: total / seen for name, total in aux_sums.items()},
            )
            history.append(result)
            if result.valid["auc"] > best_auc:
                best_auc, best_state, stale = result.valid["auc"], _copy_state(core), 0
            else:
                stale += 1
            if on_epoch is not None:
                state = FitState(
                    epoch=epoch,
                    model_state=_copy_state(core),
                    optimizer_state=copy.deepcopy(optimizer.state_dict()),
                    best_state=best_state,
                    best_auc=best_auc,
                    stale=stale,
                    history=tuple(history),
                    shuffle_state=shuffle.get_state(),
                    rng_state=torch.get_rng_state(),
                )
                on_epoch(result, state)
            if stale >= cfg.patience:
                break
    return best_state, history


def train_model(
    dataset: Dataset,
    cfg: Config,
    out_dir: str | Path,
    show_progress: bool = True,
    features: ItemFeatures | None = None,
    samples: Samples | None = None,
) -> TrainResult:
    """DIN samples -> fit -> test metrics; writes ``model.pt`` and ``metrics.json`` into ``out_dir``.

    ``features``: item features built beforehand with :func:`build_item_features` for this dataset's
    catalogue and these samples' training split (a comparison of many models builds them once); None
    builds them from ``cfg.features``.
    ``samples``: prebuilt DIN samples (the pipeline's come from Feast); None builds them from ``dataset``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    started = time.perf_counter()
    inputs = prepare_inputs(dataset, cfg, samples=samples, features=features)
    model = build_model(cfg.train.model, inputs.catalog, inputs.features, cfg.model)
    best_state, history = fit(model, inputs.train, inputs.valid, cfg.train, show_progress=show_progress)
    return save_run(model, best_state, history, inputs, cfg, out_dir, started)


def prepare_inputs(
    dataset: Dataset, cfg: Config, samples: Samples | None = None, features: ItemFeatures | None = None
) -> RunInputs:
    """Samples (built unless given), catalogue, item features (built unless given, the statistics'
    buckets fitted on the training split) and encoded splits."""
    if samples is None:
        samples = build_samples(dataset, cfg.samples)
    catalog = ItemCatalog.from_items(dataset.items)
    if features is None:
        statistics = fit_statistics(samples.train, cfg.model.stats_buckets)
        features = build_item_features(dataset, catalog, cfg.features, statistics, image_table(cfg.embed))
    elif features.n_items != len(catalog.items):
        raise ValueError(f"features cover {features.n_items} item codes, the catalogue {len(catalog.items)}")
    train, valid, test = (
        encode_samples(samples.split(s), catalog, cfg.samples.max_history, features.statistics)
        for s in ("train", "valid", "test")
    )
    return RunInputs(catalog, features, train, valid, test, item_stat_table(dataset, earliest_time(dataset)))


def save_run(
    model: CTRModel,
    best_state: dict[str, torch.Tensor],
    history: list[EpochResult],
    inputs: RunInputs,
    cfg: Config,
    out_dir: Path,
    started: float,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Best weights -> test scores -> ``metrics.json`` (with ``extra`` keys), ``model.pt`` and
    ``training_curve.png`` (:mod:`marn.curves`) in ``out_dir``.

    Shared by :func:`train_model` and the Ray Train driver, so both write the same files.
    ``started``: the ``time.perf_counter()`` of the run's start, for ``wall_s``.
    """
    if not history:
        raise ValueError("no epoch was trained: nothing to score")
    model.load_state_dict(best_state)
    train, valid, test = inputs.train, inputs.valid, inputs.test
    best = max(history, key=lambda r: r.valid["auc"])
    test_scores = predict(model, test)  # click probabilities, one per test sample
    metrics: dict[str, Any] = {
        **ctr_metrics(test.users, test.tensors["label"].numpy(), test_scores),
        **item_slices(model, inputs, test_scores),
        "model": cfg.train.model,
        "best_epoch": best.epoch,
        "epochs_run": len(history),
        "valid": best.valid,
        "history": [
            {
                "epoch": r.epoch,
                "train_loss": r.train_loss,
                "valid_auc": r.valid["auc"],
                "seconds": r.seconds,
                **r.aux,
            }
            for r in history
        ],
        "samples": {"train": len(train), "valid": len(valid), "test": len(test)},
        "seed": cfg.train.seed,
        "wall_s": time.perf_counter() - started,
        **(extra or {}),
    }
    checkpoint = out_dir / CHECKPOINT
    torch.save(
        {
            "model": cfg.train.model,
            "state_dict": best_state,
            "catalog": inputs.catalog.to_dict(),
            "features": inputs.features.to_dict(),  # with the statistics' bucket boundaries
            "config": cfg.model_dump(mode="json"),
        },
        checkpoint,
    )
    metrics_path = out_dir / METRICS
    metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    write_training_curve(metrics["history"], out_dir / CURVE, f"{cfg.train.model}: training curve")
    return TrainResult(metrics, checkpoint, metrics_path)


def item_slices(model: CTRModel, inputs: RunInputs, test_scores: np.ndarray) -> dict[str, Any]:
    """Paper Table 4 (AUC by item-popularity level) and Table 5 (recall@N of items unseen in training).

    Popularity counts the training positives only (each training event once); "unseen" means absent from
    the whole training log as the model saw it (candidates and histories). The recall pool is the test
    items never seen in training, standing in for the paper's next-day candidate set; each pool item is
    scored with its own statistics as of the user's test time.
    """
    train, test, n_items = inputs.train, inputs.test, len(inputs.catalog.items)
    labels, items = test.tensors["label"].numpy(), test.tensors["item"].numpy()
    popularity = training_item_counts(train, n_items, histories=False)
    seen = training_item_counts(train, n_items)
    test_items = np.unique(items)
    unseen = torch.from_numpy(test_items[seen[test_items] == 0])
    return {
        "auc_by_popularity": auc_by_popularity(items, labels, test_scores, popularity),
        "unseen_recall": unseen_item_recall(model, test, unseen, pool_statistics(inputs)),
    }


def pool_statistics(inputs: RunInputs) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(rows (U,), pool (C,)) -> (U, C, F, G)`` codes of each pool item as of each test row's time."""
    item_ids = np.asarray(("", *inputs.catalog.items.values), dtype=object)  # code -> id; PAD -> ""

    def lookup(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        times = np.repeat(inputs.test.times[rows.numpy()], len(pool))
        ids = np.tile(item_ids[pool.numpy()], len(rows))
        codes = stat_codes(inputs.item_stats, ids, times, inputs.features.statistics)  # (U * C, F, G)
        return torch.from_numpy(codes).view(len(rows), len(pool), *codes.shape[1:])

    return lookup


@dataclass(frozen=True)
class TrainedModel:
    """Everything ``model.pt`` holds, rebuilt: the model (eval mode), its item catalogue, the statistics'
    bucket boundaries it was trained with, the run config and, for a model of COURIER's image vectors, the
    head that maps a backbone vector (a new item's, from Feast) into them."""

    name: str
    model: CTRModel
    catalog: ItemCatalog
    statistics: StatDiscretizer
    config: dict[str, Any]
    image_encoder: CourierHead | None = None

    def encode(self, samples: pa.Table) -> EncodedSamples:
        """Sample rows as this model reads them: its catalogue, history length and statistic buckets."""
        return encode_samples(samples, self.catalog, self.config["samples"]["max_history"], self.statistics)


def load_trained(path: str | Path) -> TrainedModel:
    """Rebuild a trained model from ``model.pt`` (eval mode) with its catalogue, statistic buckets and saved
    config: the one checkpoint reader (scoring, registration, serving, the benchmarks)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    catalog = ItemCatalog.from_dict(saved["catalog"])
    if "statistics" not in saved["features"]:
        raise ValueError(
            f"{path}: a checkpoint from before point-in-time statistics (its statistic inputs leaked the "
            "future); retrain it"
        )
    features = ItemFeatures.from_dict(saved["features"])
    model = build_model(
        saved["model"], catalog, features, ModelConfig.model_validate(saved["config"]["model"])
    )
    model.load_state_dict(saved["state_dict"])
    encoder = None if features.image_head is None else CourierHead.from_state(features.image_head)
    return TrainedModel(saved["model"], model.eval(), catalog, features.statistics, saved["config"], encoder)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch(data: EncodedSamples, index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in data.batch(index).items()}  # a no-op on CPU


def _unwrap(model: CTRModel | DistributedDataParallel) -> CTRModel:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _sync_buffers(model: CTRModel | DistributedDataParallel) -> None:
    """Give every DDP rank rank 0's learnt buffers (Dice/BatchNorm running statistics) before validating.

    Ray Train's DDP runs with ``forward_sync_buffers=False``: the item feature tables are buffers as well, too
    big to send every step. So each rank's running statistics drift apart within an epoch, and without
    this sync the ranks would disagree on validation AUC and so on when to stop. Non-persistent buffers
    are those feature tables, built alike on every rank, and are left alone.
    """
    if not (isinstance(model, DistributedDataParallel) and torch.distributed.is_initialized()):
        return
    learnt = model.module.state_dict().keys()
    for name, buffer in model.module.named_buffers():
        if name in learnt:
            torch.distributed.broadcast(buffer, src=0)
