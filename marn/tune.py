"""Ray Tune over the adversarial weight lambda0 and the learning rate, on the validation split only.

Each trial is one process running the plain ``fit`` loop (no TorchTrainer inside: the trials already
fill the cores), reporting validation metrics every epoch so ASHA can stop the weak ones early. The test
split never reaches a trial. One search is for one model and one model config (``tune.json`` records it):
what lambda0 does differs between ADV, DDMA and MARN and with the adversary's switches, so a comparison of
them searches each (``benchmarks/paper.py`` does) rather than reusing one model's best. Item features and
encoded samples go to the object store once (``tune.with_parameters``) and are shared by every trial.

Which models a tuned lambda0 applies to: only the adversarial variants (ADV, DDMA, MARN and its switch rows)
read ``model.lambda0``; every other model ignores it. A search's values are for the model it searched:
``marn train --params tune.json`` refuses another model or other model settings, the pipeline applies them
to the candidate only (its baseline keeps the configured values). Applying a result goes through
:meth:`Config.with_overrides` with tune.json's ``overrides``, which also set ``train.lambda_horizon_epochs``
to the horizon the trials used, so the trained lambda schedule is the tuned one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from marn.config import Config, ConfigError, ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.samples import Samples
from marn.data.schema import Dataset
from marn.data.tensors import EncodedSamples, ItemCatalog
from marn.ray_runtime import ray_session
from marn.train import EpochResult, FitState, fit, prepare_inputs, seed_everything

if TYPE_CHECKING:
    from rich.console import Console

TUNE_FILE = "tune.json"
METRIC = "valid_auc"  # maximised; a validation metric, never a test one
SEARCHED = ("lambda0", "lr")
SEARCHED_KEYS = {"lambda0": "model.lambda0", "lr": "train.lr"}  # each searched value's config key


@dataclass(frozen=True)
class TuneResult:
    best: dict[str, float]  # {"lambda0": .., "lr": ..}
    overrides: dict[str, Any]  # for Config.with_overrides: the best values and the schedule's horizon
    best_valid_auc: float  # the best trial's best epoch
    trials: list[dict[str, Any]]  # one per trial: its config, epochs run, validation history, status
    path: Path  # tune.json


def tune_hyperparameters(
    dataset: Dataset,
    cfg: Config,
    out_dir: str | Path,
    samples: Samples | None = None,
    console: Console | None = None,
) -> TuneResult:
    """Search lambda0 and lr (log-uniform in ``cfg.tune``'s ranges; low == high fixes one) for
    ``cfg.tune.model`` with ASHA; write ``tune.json`` into ``out_dir``.

    ``samples``: prebuilt DIN samples (the pipeline's come from Feast); None builds them from ``dataset``.
    ``console``: shows the trials as results arrive (:class:`marn.ray_progress.TrialTable`).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from marn.models import build_model

    search = cfg.tune  # its ranges and epochs are checked by TuneConfig's validators
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    started = time.perf_counter()
    inputs = prepare_inputs(dataset, cfg, samples=samples)
    build_model(search.model, inputs.catalog, inputs.features, cfg.model)  # an unknown name fails before Ray
    storage = (out_dir / "ray").resolve()  # Ray wants an absolute path
    run_name = f"tune-{search.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    with ray_session(cfg.ray), _trial_reporter(console) as callbacks:
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
            run_config=tune.RunConfig(
                name=run_name, storage_path=str(storage), verbose=0, callbacks=callbacks
            ),
        )
        grid = tuner.fit()
        trials = [_trial_summary(result, search.max_epochs) for result in grid]

    scored = [t for t in trials if t["valid_auc"] is not None]
    if not scored:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials)
        raise RuntimeError(f"every tuning trial failed: {errors}")
    best_trial = max(scored, key=lambda t: t["valid_auc"])
    best = {name: best_trial[name] for name in SEARCHED}
    overrides = tuned_overrides(best, search_horizon(cfg))
    path = out_dir / TUNE_FILE
    report = {
        "model": search.model,
        "metric": METRIC,
        "best": best,
        "best_valid_auc": best_trial["valid_auc"],
        "best_trial": best_trial["trial_id"],
        "lambda_horizon_epochs": search_horizon(cfg),  # every trial's lambda schedule ran over this many
        "overrides": overrides,  # what `marn train --params` applies (Config.with_overrides)
        "search": search.model_dump(mode="json"),
        # the model section every trial started from (its switches); lambda0 is the searched one
        "model_config": cfg.model.model_dump(mode="json"),
        "trials": trials,
        "wall_s": time.perf_counter() - started,
        "ray_run": str(storage / run_name),
    }
    path.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    return TuneResult(best, overrides, best_trial["valid_auc"], trials, path)


def search_horizon(cfg: Config) -> int:
    """The epochs of the lambda schedule in every trial: the config's explicit horizon, else
    ``tune.max_epochs`` (the most a trial trains)."""
    return cfg.train.lambda_horizon_epochs or cfg.tune.max_epochs


def tuned_overrides(best: dict[str, float], horizon_epochs: int) -> dict[str, Any]:
    """``best`` ({"lambda0": .., "lr": ..}) and the search's horizon as :meth:`Config.with_overrides` keys."""
    if not isinstance(best, dict) or set(best) != set(SEARCHED):
        raise ConfigError(f"expected exactly the tuned keys {list(SEARCHED)}, got {best!r}")
    return {
        **{SEARCHED_KEYS[name]: value for name, value in best.items()},
        "train.lambda_horizon_epochs": horizon_epochs,
    }


def result_overrides(report: Any, cfg: Config, source: str) -> dict[str, Any]:
    """The overrides of a parsed tune.json for ``cfg``, refused when ``report`` is not a tune result or
    searched another model or other model settings than ``cfg`` (its ``train.model`` and ``model``).

    A tune.json from before ``overrides`` were recorded: its best values over ``search.max_epochs``, the
    horizon its trials had.
    """
    if not isinstance(report, dict) or not {"model", "best", "model_config"} <= set(report):
        raise ConfigError(f"{source}: not a tune result (the tune.json `marn tune` writes)")
    if "overrides" in report:
        overrides = report["overrides"]
        if not isinstance(overrides, dict):
            raise ConfigError(f"{source}: its overrides must be a mapping of config keys")
    else:
        overrides = tuned_overrides(report["best"], report.get("search", {}).get("max_epochs"))
    # A setting added after the search ran is absent from its model_config: the search ran with what the
    # code did then, which every new setting's default keeps.
    defaults = ModelConfig().model_dump(mode="json")
    searched = {k: v for k, v in {**defaults, **report["model_config"]}.items() if k != "lambda0"}
    wanted = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k != "lambda0"}
    if report["model"] != cfg.train.model or searched != wanted:
        changed = sorted(k for k in wanted.keys() | searched.keys() if searched.get(k) != wanted.get(k))
        raise ConfigError(
            f"{source} searched {report['model']} with model settings {changed or 'the same'}; this config "
            f"trains {cfg.train.model}: tuned values apply to the searched model and settings only"
        )
    return overrides


def read_tune_overrides(path: str | Path, cfg: Config) -> dict[str, Any]:
    """:func:`result_overrides` of the tune.json at ``path``, with clear errors for a missing or bad file."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"tune result not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a tune result (not JSON: {err})") from None
    return result_overrides(report, cfg, str(path))


@contextmanager
def _trial_reporter(console: Console | None) -> Iterator[list[Any]]:
    """Tune callbacks that show the trials on ``console`` while the search runs (none without one)."""
    if console is None:
        yield []
        return
    from marn.ray_progress import TrialTable

    with TrialTable(console, SEARCHED) as table:
        yield [table]


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

    trial_cfg = trial_config(cfg, {name: config[name] for name in SEARCHED})
    seed_everything(trial_cfg.train.seed)  # same initial weights in every trial: only lambda0 and lr differ
    model = build_model(cfg.tune.model, catalog, features, trial_cfg.model)

    def report(result: EpochResult, state: FitState) -> None:
        tune.report(result.flat_metrics())

    fit(model, train, valid, trial_cfg.train, on_epoch=report, show_progress=False)


def trial_config(cfg: Config, values: dict[str, float]) -> Config:
    """A trial's config: the searched model for ``tune.max_epochs`` with ``values`` and the search's
    horizon, the same overrides that applying the result gives a training run."""
    return cfg.with_overrides(
        {
            **tuned_overrides(values, search_horizon(cfg)),
            "train.model": cfg.tune.model,
            "train.epochs": cfg.tune.max_epochs,
        }
    )


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
