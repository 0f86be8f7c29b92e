"""Ray Tune over the adversarial weight lambda0 and the learning rate, on the validation split only.

Each trial is one process running the plain ``fit`` loop (no TorchTrainer inside: the trials already
fill the cores), reporting validation metrics every epoch so ASHA can stop the weak ones early. The test
split never reaches a trial. One search is for one model and one model config (``tune.json`` records it):
what lambda0 does differs between ADV, DDMA and MARN and with the adversary's switches, so a comparison of
them searches each (``benchmarks/paper.py`` does) rather than reusing one model's best. Item features and
encoded samples go to the object store once (``tune.with_parameters``) and are shared by every trial.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from marn.config import Config
from marn.data.item_features import ItemFeatures
from marn.data.samples import Samples
from marn.data.schema import Dataset
from marn.data.tensors import EncodedSamples, ItemCatalog
from marn.ray_runtime import ray_session
from marn.train import EpochResult, FitState, fit, prepare_inputs, seed_everything

TUNE_FILE = "tune.json"
METRIC = "valid_auc"  # maximised; a validation metric, never a test one
SEARCHED = ("lambda0", "lr")


@dataclass(frozen=True)
class TuneResult:
    best: dict[str, float]  # {"lambda0": .., "lr": ..}: feed to apply_best
    best_valid_auc: float  # the best trial's best epoch
    trials: list[dict[str, Any]]  # one per trial: its config, epochs run, validation history, status
    path: Path  # tune.json


def tune_hyperparameters(
    dataset: Dataset, cfg: Config, out_dir: str | Path, samples: Samples | None = None
) -> TuneResult:
    """Search lambda0 and lr (log-uniform in ``cfg.tune``'s ranges; low == high fixes one) for
    ``cfg.tune.model`` with ASHA; write ``tune.json`` into ``out_dir``.

    ``samples``: prebuilt DIN samples (the pipeline's come from Feast); None builds them from ``dataset``.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from marn.models import build_model

    search = cfg.tune
    for name, (low, high) in (("lambda0_range", search.lambda0_range), ("lr_range", search.lr_range)):
        if not 0 < low <= high:
            raise ValueError(
                f"tune.{name} must satisfy 0 < low <= high for a log-uniform search, got {low, high}"
            )
    if search.grace_epochs > search.max_epochs:
        raise ValueError(
            f"tune.grace_epochs={search.grace_epochs} exceeds tune.max_epochs={search.max_epochs}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    started = time.perf_counter()
    inputs = prepare_inputs(dataset, cfg, samples=samples)
    build_model(search.model, inputs.catalog, inputs.features, cfg.model)  # an unknown name fails before Ray
    storage = (out_dir / "ray").resolve()  # Ray wants an absolute path
    run_name = f"tune-{search.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    with ray_session(cfg.ray):
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial,
                cfg=cfg,
                catalog=inputs.catalog,
                features=inputs.features,
                train=inputs.train,
                valid=inputs.valid,  # the test split stays in the driver
            ),
            {"cpu": search.cpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={
                "lambda0": _log_uniform(tune, search.lambda0_range),
                "lr": _log_uniform(tune, search.lr_range),
            },
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=search.trials,
                search_alg=BasicVariantGenerator(random_state=np.random.default_rng(search.seed)),
                scheduler=ASHAScheduler(max_t=search.max_epochs, grace_period=search.grace_epochs),
            ),
            run_config=tune.RunConfig(name=run_name, storage_path=str(storage), verbose=0),
        )
        grid = tuner.fit()
        trials = [_trial_summary(result, search.max_epochs) for result in grid]

    scored = [t for t in trials if t["valid_auc"] is not None]
    if not scored:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials)
        raise RuntimeError(f"every tuning trial failed: {errors}")
    best_trial = max(scored, key=lambda t: t["valid_auc"])
    best = {name: best_trial[name] for name in SEARCHED}
    path = out_dir / TUNE_FILE
    report = {
        "model": search.model,
        "metric": METRIC,
        "best": best,
        "best_valid_auc": best_trial["valid_auc"],
        "best_trial": best_trial["trial_id"],
        "search": search.model_dump(mode="json"),
        # the model section every trial started from (its switches); lambda0 is the searched one
        "model_config": cfg.model.model_dump(mode="json"),
        "trials": trials,
        "wall_s": time.perf_counter() - started,
        "ray_run": str(storage / run_name),
    }
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return TuneResult(best, best_trial["valid_auc"], trials, path)


def apply_best(cfg: Config, best: dict[str, float]) -> Config:
    """A copy of ``cfg`` with the tuned ``model.lambda0`` and ``train.lr`` (validated like a config file)."""
    if set(best) != set(SEARCHED):
        raise ValueError(f"expected exactly the keys {list(SEARCHED)}, got {sorted(best)}")
    raw = cfg.model_dump()
    raw["model"]["lambda0"] = best["lambda0"]
    raw["train"]["lr"] = best["lr"]
    return Config.model_validate(raw)


def _log_uniform(tune: Any, bounds: tuple[float, float]) -> Any:
    """Tune's log-uniform domain; a range with low == high fixes the value (searched in no trial)."""
    low, high = bounds
    return low if low == high else tune.loguniform(low, high)


def _trial(
    config: dict[str, float],
    cfg: Config,
    catalog: ItemCatalog,
    features: ItemFeatures,
    train: EncodedSamples,
    valid: EncodedSamples,
) -> None:
    """One Tune trial: ``fit`` with this trial's lambda0 and lr, reporting validation metrics per epoch."""
    from ray import tune

    from marn.models import build_model

    trial_cfg = apply_best(cfg, {name: config[name] for name in SEARCHED})
    train_cfg = trial_cfg.train.model_copy(update={"model": cfg.tune.model, "epochs": cfg.tune.max_epochs})
    seed_everything(train_cfg.seed)  # same initial weights in every trial: only lambda0 and lr differ
    model = build_model(cfg.tune.model, catalog, features, trial_cfg.model)

    def report(result: EpochResult, state: FitState) -> None:
        tune.report(result.flat_metrics())

    fit(model, train, valid, train_cfg, on_epoch=report, show_progress=False)


def _trial_summary(result: Any, max_epochs: int) -> dict[str, Any]:
    """A trial as tune.json records it; ``valid_auc`` is its best epoch's (None when it failed early)."""
    rows = result.metrics_dataframe
    history: list[dict[str, Any]] = []
    if rows is not None and METRIC in rows:
        # Only what the trial itself reported, not Tune's bookkeeping columns (time, host, pid ...).
        reported = ["epoch", "train_loss", *(c for c in rows.columns if c.startswith("valid_"))]
        history = rows[reported].to_dict(orient="records")
    aucs = [row[METRIC] for row in history]
    return {
        "trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name),
        **{name: float(result.config[name]) for name in SEARCHED},
        "valid_auc": max(aucs) if aucs else None,
        "epochs": len(history),
        "stopped_early": len(history) < max_epochs,  # by ASHA, or by fit's patience
        "error": None if result.error is None else str(result.error).splitlines()[0],
        "history": history,
    }
