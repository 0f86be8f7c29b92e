"""The training loop: plain torch, one process. Ray Train will run ``fit`` unchanged inside its workers.

``train_model`` is the whole job for one model on one dataset: DIN samples -> tensors -> ``fit`` with
early stopping on validation AUC -> the best checkpoint scored on test -> ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from marn.config import Config, ModelConfig, TrainConfig
from marn.data.item_features import ItemFeatures, build_item_features
from marn.data.samples import build_samples
from marn.data.schema import Dataset
from marn.data.tensors import EncodedSamples, ItemCatalog, encode_samples
from marn.evaluate import auc_by_popularity, ctr_metrics, training_item_counts, unseen_item_recall
from marn.models import CTRModel, build_model

CHECKPOINT = "model.pt"
METRICS = "metrics.json"


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float  # the CTR log loss, averaged over the epoch's samples
    valid: dict[str, float]
    seconds: float
    aux: dict[str, float] = field(default_factory=dict)  # auxiliary losses (adversarial, DIEN), epoch means


@dataclass(frozen=True)
class TrainResult:
    metrics: dict[str, Any]
    checkpoint: Path
    metrics_path: Path


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def predict(model: CTRModel, data: EncodedSamples, batch_size: int = 4096) -> np.ndarray:
    """Click probabilities for every sample, in order."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            index = torch.arange(start, min(start + batch_size, len(data)))
            out.append(torch.sigmoid(model(data.batch(index)).logits))
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.float32)


def evaluate_split(model: CTRModel, data: EncodedSamples) -> dict[str, float]:
    labels = data.tensors["label"].numpy()
    return ctr_metrics(data.users, labels, predict(model, data))


def fit(
    model: CTRModel,
    train: EncodedSamples,
    valid: EncodedSamples,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochResult, dict[str, torch.Tensor]], None] | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[EpochResult]]:
    """Train with AdaGrad and early stopping on validation AUC; return the best state dict and history.

    ``on_epoch`` sees each epoch's result and the current weights (Ray Train reports and checkpoints there).
    """
    optimizer = torch.optim.Adagrad(
        model.parameters(), lr=cfg.lr, initial_accumulator_value=cfg.adagrad_initial_accumulator
    )
    bce = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(cfg.seed)
    best_auc, best_state, stale, history = -1.0, _copy_state(model), 0, []
    steps_per_epoch = max(1, -(-len(train) // cfg.batch_size))
    total_steps, step = cfg.epochs * steps_per_epoch, 0
    with _progress(show_progress) as bar:
        task = bar.add_task("train", total=total_steps)
        for epoch in range(1, cfg.epochs + 1):
            started, ctr_loss, seen = time.perf_counter(), 0.0, 0
            aux_sums: dict[str, float] = {}
            model.train()
            for index in torch.randperm(len(train), generator=shuffle).split(cfg.batch_size):
                batch = train.batch(index)
                out = model(batch, progress=step / total_steps)  # p of the lambda schedule
                loss = bce(out.logits, batch["label"])
                ctr_loss += loss.item() * len(index)
                if out.aux_loss is not None:
                    loss = loss + out.aux_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, value in out.aux.items():
                    aux_sums[name] = aux_sums.get(name, 0.0) + value.item() * len(index)
                seen += len(index)
                step += 1
                bar.update(task, advance=1, description=f"epoch {epoch} loss {ctr_loss / seen:.4f}")
            valid_metrics = evaluate_split(model, valid)
            seen = max(seen, 1)
            result = EpochResult(
                epoch,
                ctr_loss / seen,
                valid_metrics,
                time.perf_counter() - started,
                {name: total / seen for name, total in aux_sums.items()},
            )
            history.append(result)
            if on_epoch is not None:
                on_epoch(result, model.state_dict())
            if result.valid["auc"] > best_auc:
                best_auc, best_state, stale = result.valid["auc"], _copy_state(model), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    return best_state, history


def train_model(
    dataset: Dataset,
    cfg: Config,
    out_dir: str | Path,
    show_progress: bool = True,
    features: ItemFeatures | None = None,
) -> TrainResult:
    """DIN samples -> fit -> test metrics; writes ``model.pt`` and ``metrics.json`` into ``out_dir``.

    ``features``: item features built beforehand with :func:`build_item_features` for this dataset's
    catalogue (a comparison of many models builds them once); None builds them from ``cfg.features``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    started = time.perf_counter()
    samples = build_samples(dataset, cfg.samples)
    catalog = ItemCatalog.from_items(dataset.items)
    if features is None:
        features = build_item_features(dataset, catalog, cfg.features, cfg.model.stats_buckets)
    elif features.n_items != len(catalog.items):
        raise ValueError(f"features cover {features.n_items} item codes, the catalogue {len(catalog.items)}")
    train, valid, test = (
        encode_samples(samples.split(s), catalog, cfg.samples.max_history) for s in ("train", "valid", "test")
    )
    model = build_model(cfg.train.model, catalog, features, cfg.model)
    best_state, history = fit(model, train, valid, cfg.train, show_progress=show_progress)
    model.load_state_dict(best_state)
    best = max(history, key=lambda r: r.valid["auc"])
    test_scores = predict(model, test)  # click probabilities, one per test sample
    metrics: dict[str, Any] = {
        **ctr_metrics(test.users, test.tensors["label"].numpy(), test_scores),
        **item_slices(model, train, test, test_scores, len(catalog.items)),
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
    }
    checkpoint = out_dir / CHECKPOINT
    torch.save(
        {
            "model": cfg.train.model,
            "state_dict": best_state,
            "catalog": catalog.to_dict(),
            "features": features.to_dict(),
            "config": cfg.model_dump(mode="json"),
        },
        checkpoint,
    )
    metrics_path = out_dir / METRICS
    metrics_path.write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    return TrainResult(metrics, checkpoint, metrics_path)


def item_slices(
    model: CTRModel, train: EncodedSamples, test: EncodedSamples, test_scores: np.ndarray, n_items: int
) -> dict[str, Any]:
    """Paper Table 4 (AUC by item-popularity level) and Table 5 (recall@N of items unseen in training).

    Popularity counts the training positives only (each training event once); "unseen" means absent from
    the whole training log as the model saw it (candidates and histories). The recall pool is the test
    items never seen in training, standing in for the paper's next-day candidate set.
    """
    labels, items = test.tensors["label"].numpy(), test.tensors["item"].numpy()
    popularity = training_item_counts(train, n_items, histories=False)
    seen = training_item_counts(train, n_items)
    test_items = np.unique(items)
    unseen = torch.from_numpy(test_items[seen[test_items] == 0])
    return {
        "auc_by_popularity": auc_by_popularity(items, labels, test_scores, popularity),
        "unseen_recall": unseen_item_recall(model, test, unseen),
    }


def load_checkpoint(path: str | Path) -> tuple[CTRModel, dict[str, Any]]:
    """Rebuild a trained model from ``model.pt``; returns the model (eval mode) and the saved config."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(
        saved["model"],
        ItemCatalog.from_dict(saved["catalog"]),
        ItemFeatures.from_dict(saved["features"]),
        ModelConfig.model_validate(saved["config"]["model"]),
    )
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved["config"]


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
