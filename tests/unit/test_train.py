"""The training loop end to end on a small dataset with a popularity signal LR can learn."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from marn.config import load_config
from marn.data.samples import build_samples
from marn.data.schema import Dataset
from marn.data.tensors import ItemCatalog, encode_samples, fit_statistics
from marn.train import load_trained, predict, train_model


def _popular_items_dataset(n_users=300, n_items=200, seed=0) -> Dataset:
    """Users pick items with Zipf-like popularity, so random negatives are mostly unpopular items."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.2
    weights /= weights.sum()
    rows = []
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    for u in range(n_users):
        picks = rng.choice(n_items, size=int(rng.integers(5, 15)), replace=False, p=weights)
        for k, item in enumerate(picks):
            rows.append((f"u{u}", f"i{item}", "click", t0 + pd.Timedelta(hours=u + k)))
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "category_id": [f"c{i % 7}" for i in range(n_items)],
            "brand_id": None,
            "shop_id": None,
        }
    )
    return Dataset(events=pd.DataFrame(rows, columns=["user_id", "item_id", "behavior", "ts"]), items=items)


@pytest.fixture(scope="module")
def dataset():
    return _popular_items_dataset()


def _cfg(**train):
    return load_config(None, {"train": {"model": "lr", "epochs": 4, "batch_size": 64, **train}})


def test_train_writes_metrics_and_a_checkpoint_that_reproduces_predictions(tmp_path, dataset):
    result = train_model(dataset, _cfg(), tmp_path, show_progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("auc", "user_auc", "logloss", "best_epoch", "history", "samples"):
        assert key in metrics
    assert metrics["auc"] > 0.7  # popularity is learnable from item ids
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    trained = load_trained(result.checkpoint)
    model, config = trained.model, trained.config
    assert config["train"]["model"] == "lr"
    samples = build_samples(dataset, _cfg().samples)
    test = trained.encode(samples.test)  # the model's own statistic buckets
    from marn.evaluate import auc

    assert auc(test.tensors["label"].numpy(), predict(model, test)) == pytest.approx(metrics["auc"], abs=1e-6)


def test_same_seed_same_run_and_early_stopping(tmp_path, dataset):
    a = train_model(dataset, _cfg(seed=3), tmp_path / "a", show_progress=False).metrics
    b = train_model(dataset, _cfg(seed=3), tmp_path / "b", show_progress=False).metrics
    assert a["auc"] == b["auc"] and a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    # A learning rate of 0 never improves validation AUC after epoch 1: patience 1 stops at epoch 2.
    stopped = train_model(dataset, _cfg(lr=1e-12, epochs=10, patience=1), tmp_path / "c", show_progress=False)
    assert stopped.metrics["epochs_run"] == 2 and stopped.metrics["best_epoch"] == 1


def test_unknown_model_is_a_clear_error(tmp_path, dataset):
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        train_model(dataset, _cfg(model="nope"), tmp_path, show_progress=False)


def test_lr_overfits_a_tiny_batch(dataset):
    samples = build_samples(dataset, _cfg().samples)
    catalog = ItemCatalog.from_items(dataset.items)
    statistics = fit_statistics(samples.train, (10, 100))
    data = encode_samples(samples.train.slice(0, 16), catalog, 50, statistics)
    from marn.config import FeaturesConfig, ModelConfig
    from marn.data.item_features import build_item_features
    from marn.models import build_model

    features = build_item_features(dataset, catalog, FeaturesConfig(image="pixels"), statistics)
    model = build_model("lr", catalog, features, ModelConfig())
    opt = torch.optim.Adagrad(model.parameters(), lr=0.5)
    batch = data.batch(torch.arange(16))
    for _ in range(200):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits, batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def _fit_lr(dataset, **train):
    """fit on the lr model for one epoch; returns (model before, model after, history, on_step calls)."""
    import copy

    from marn.config import FeaturesConfig, ModelConfig
    from marn.data.item_features import build_item_features
    from marn.models import build_model
    from marn.train import fit

    cfg = _cfg(epochs=1, **train)
    samples = build_samples(dataset, cfg.samples)
    catalog = ItemCatalog.from_items(dataset.items)
    statistics = fit_statistics(samples.train, (10, 100))
    train_split, valid = (
        encode_samples(samples.split(s), catalog, 20, statistics) for s in ("train", "valid")
    )
    features = build_item_features(dataset, catalog, FeaturesConfig(image="pixels"), statistics)
    torch.manual_seed(0)
    model = build_model("lr", catalog, features, ModelConfig())
    before = copy.deepcopy(model)
    steps: list[tuple[int, dict[str, float]]] = []
    _, history = fit(model, train_split, valid, cfg.train, show_progress=False,
                     on_step=lambda step, losses: steps.append((step, losses)))  # fmt: skip
    return before, model, history, steps, len(train_split)


def _moved(before, after) -> float:
    return sum(
        (a - b).abs().sum().item() for a, b in zip(after.parameters(), before.parameters(), strict=True)
    )


def test_on_step_sees_every_step_and_its_ctr_loss(dataset):
    _, _, history, steps, n = _fit_lr(dataset)
    assert [s for s, _ in steps] == list(range(1, -(-n // 64) + 1))
    sizes = [64] * (n // 64) + ([n % 64] if n % 64 else [])
    weighted = sum(losses["ctr"] * size for (_, losses), size in zip(steps, sizes, strict=True)) / n
    assert weighted == pytest.approx(history[0].train_loss, rel=1e-6)


def test_gradient_clipping_bounds_the_updates(dataset):
    free_before, free, *_ = _fit_lr(dataset)
    clipped_before, clipped, *_ = _fit_lr(dataset, clip_grad_norm=1e-6)
    assert _moved(clipped_before, clipped) < 1e-3 * _moved(free_before, free)
