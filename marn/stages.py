"""The pipeline's stages as plain functions: paths and a Config in, files and a small summary out.

Each KFP component (components/) is one call into this module, and ``marn pipeline run --local`` runs the
same components through the KFP local runner, so a stage behaves the same on a laptop and in Kubeflow.
Order (docs/design.md, "Architecture and data flow")::

    validate -> embed -> features (Feast, samples) -> courier -> tune -> train -> evaluate -> register
    -> deploy

(courier trains only with ``embed.method: courier``; otherwise it passes the dataset on.)

Every summary is JSON-serialisable; the components log its numbers as KFP metrics.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from marn.config import Config, work_path  # work_path: also imported from here by serve/
from marn.registry import GateDecision, RegisteredModel, champion, gate, register_model, registered_version

if TYPE_CHECKING:
    from collections.abc import Callable

    from marn.embed.courier import ProgressHook as CourierProgress
    from marn.embed.stage import ProgressHook

log = logging.getLogger(__name__)

SERVE_CONFIG = "serve_config.yaml"
DATASET_REF = "dataset.json"  # a Dataset artifact: which data directory, and a hash of its tables


def registry_dir(cfg: Config) -> Path:
    return cfg.paths.work_dir / "registry"


def validate_stage(data_dir: Path, cfg: Config, report_html: Path) -> dict[str, Any]:
    """The data gate: raise DataValidationError (failing the run) on bad data; the HTML report either way."""
    from marn.validate.dataset import validate_dataset
    from marn.validate.report import DataValidationError

    result = validate_dataset(data_dir, cfg.validation)
    report_html.parent.mkdir(parents=True, exist_ok=True)
    report_html.write_text(result.to_html())
    if not result.success:
        raise DataValidationError(result)  # it takes the report (its message is the report's text)
    return {"valid": True, "seconds": result.elapsed_s}


def embed_stage(data_dir: Path, cfg: Config, progress: ProgressHook | None = None) -> dict[str, Any]:
    """Image vectors (backbone per config) and title vectors into the dataset directory, cached by content.
    ``progress``: see :data:`marn.embed.stage.ProgressHook` (``marn embed`` draws it)."""
    from marn.embed.stage import embed_items

    summary = embed_items(
        data_dir,
        cfg.embed,
        cfg.ray,
        cache_dir=work_path(cfg, cfg.embed.cache_dir, "embed-cache"),
        word_vectors=cfg.features.word_vectors,
        show_progress=False,
        progress=progress,
    )
    return _jsonable(asdict(summary))


def features_stage(data_dir: Path, cfg: Config, samples_dir: Path) -> dict[str, Any]:
    """Feast apply + materialize, then DIN samples by point-in-time retrieval, into ``samples_dir``."""
    from marn.data.samples import write_samples
    from marn.data.schema import read_dataset
    from marn.features.materialize import materialize_features
    from marn.features.point_in_time import samples_from_feature_store

    repo_dir = work_path(cfg, cfg.feast.repo_dir, "feast")
    summary = materialize_features(data_dir, cfg, repo_dir)
    started = time.perf_counter()
    samples = samples_from_feature_store(read_dataset(data_dir), cfg, repo_dir)
    write_samples(samples_dir, samples)
    return {
        **_jsonable(asdict(summary)),
        "retrieval_s": time.perf_counter() - started,
        "samples": {split: samples.split(split).num_rows for split in ("train", "valid", "test")},
    }


def courier_stage(
    data_dir: Path,
    cfg: Config,
    samples_dir: Path | None = None,
    progress: CourierProgress | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """COURIER (``embed.method: courier``): a head over the embed stage's poster vectors trained on the
    training split's clicks; writes courier_embeddings.parquet and courier_metrics.json into ``data_dir``.
    Samples from ``samples_dir`` (the features stage's), else built here (:func:`build_samples`, the same
    rows). ``progress``/``report``: a bar per epoch and a line per epoch (``marn courier`` draws them)."""
    from marn.embed.courier import read_sample_rows, train_courier

    if samples_dir is None:
        from marn.data.samples import build_samples
        from marn.data.schema import read_dataset

        samples = build_samples(read_dataset(data_dir), cfg.samples)
        train, valid = samples.train, samples.valid
    else:
        train, valid = (read_sample_rows(samples_dir, split) for split in ("train", "valid"))
    summary = train_courier(data_dir, train, valid, cfg.embed.courier, progress=progress, report=report)
    return _jsonable(asdict(summary))


def tune_stage(data_dir: Path, samples_dir: Path, cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Ray Tune over lambda0 and the learning rate on the validation split; returns the best values."""
    from marn.data.samples import read_samples
    from marn.data.schema import read_dataset
    from marn.tune import tune_hyperparameters

    if not cfg.pipeline.tune:
        return {"best": {"lambda0": cfg.model.lambda0, "lr": cfg.train.lr}, "tuned": False}
    result = tune_hyperparameters(read_dataset(data_dir), cfg, out_dir, samples=read_samples(samples_dir))
    return {"best": dict(result.best), "best_valid_auc": result.best_valid_auc, "tuned": True}


def train_stage(
    data_dir: Path, samples_dir: Path, cfg: Config, model: str, params: dict[str, float], out_dir: Path
) -> dict[str, Any]:
    """Ray Train (``distributed.workers`` workers) with the tuned lambda0 and learning rate."""
    from marn.data.samples import read_samples
    from marn.data.schema import read_dataset
    from marn.distributed import train_distributed

    cfg = cfg.with_overrides({"train.model": model, **training_overrides(cfg, model, params)})
    if cfg.pipeline.flip and model == cfg.pipeline.model:
        return _jsonable(flip_train_stage(data_dir, samples_dir, cfg, out_dir))
    result = train_distributed(read_dataset(data_dir), cfg, out_dir, samples=read_samples(samples_dir))
    return _jsonable(result.metrics)


def flip_train_stage(data_dir: Path, samples_dir: Path, cfg: Config, out_dir: Path) -> dict[str, Any]:
    """``pipeline.flip``: the candidate ID tower pretrained by ALT/FLIP on the training rows, then finetuned
    alone (strategy "id"), in this process (the frozen MiniLM's text cache is built once, here): the run
    directory is an ordinary one of ``flip.tower``, which the later stages gate, register and serve."""
    from marn.data.samples import read_samples
    from marn.data.schema import read_dataset
    from marn.flip.run import describe_epoch, prepare_flip_inputs, run_flip

    dataset = read_dataset(data_dir)
    print(f"flip: encoding the prompts' segments with the frozen MiniLM ({cfg.flip.tower})", flush=True)
    inputs = prepare_flip_inputs(dataset, cfg, samples=read_samples(samples_dir))
    print(
        f"flip: {len(inputs.cache.item_segments):,} item and {len(inputs.cache.user_segments):,} user "
        f"segments in {inputs.encode_s:.1f} s; {cfg.flip.pretrain_epochs} pretraining epochs, then finetune",
        flush=True,
    )
    metrics = run_flip(dataset, cfg, out_dir, inputs=inputs, show_progress=False)
    summary = metrics["flip"]
    for epoch in summary["pretrain_history"]:
        print(f"flip: {describe_epoch(epoch, summary['losses'])}", flush=True)
    print(
        f"flip: finetuned in {summary['finetune_s']:.1f} s, best epoch {metrics['best_epoch']}, "
        f"test AUC {metrics['auc']:.4f}",
        flush=True,
    )
    return metrics


def training_overrides(cfg: Config, model: str, params: dict[str, float]) -> dict[str, Any]:
    """The tune stage's best values (``params``) for :meth:`Config.with_overrides`, with the horizon the
    search used; none for a model other than the searched one (the baseline keeps its configured values)
    or when the pipeline does not tune (``params`` are then the configured values already)."""
    from marn.tune import search_horizon, tuned_overrides

    if not params or not cfg.pipeline.tune or model != cfg.tune.model:
        return {}
    return tuned_overrides(params, search_horizon(cfg))


def evaluate_stage(run_dir: Path, samples_dir: Path, cfg: Config) -> dict[str, Any]:
    """Score the checkpoint artifact on the test split (not the trainer's numbers), re-score the champion
    on the same split, and gate the one against the other."""
    from marn.data.samples import read_samples

    test = read_samples(samples_dir).test
    metrics = score_checkpoint(run_dir / "model.pt", test)
    current = champion(registry_dir(cfg), metrics["model"])
    champion_metrics, why = None, None
    if current is not None:
        try:
            champion_metrics = score_checkpoint(current.checkpoint, test)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # an old format, other statistics ...
            why = f"{type(err).__name__}: {err}"
    decision = gate(metrics, current, cfg.pipeline.min_improvement, champion_metrics, why)
    out: dict[str, Any] = {"metrics": metrics, "gate": _without_none(asdict(decision))}
    if champion_metrics is not None:
        out["champion_metrics"] = champion_metrics
    return out


def score_checkpoint(checkpoint: Path, samples: Any) -> dict[str, Any]:
    """CTR metrics of a saved model on sample rows (a test split), encoded the way that model reads them."""
    from marn.evaluate import ctr_metrics
    from marn.train import load_trained, predict

    trained = load_trained(checkpoint)
    data = trained.encode(samples)
    metrics = ctr_metrics(data.users, data.tensors["label"].numpy(), predict(trained.model, data))
    return {**metrics, "model": trained.name}


def register_stage(run_dir: Path, data_dir: Path, evaluation: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Register a model that passed the gate. MARN (4.9.2): the new version's item representations go to
    Feast, in the version's own view, before it becomes the champion; then the views of versions older
    than the champion it replaced are deleted. The replaced one stays: scorers started before the flip
    serve it until they restart (a restarted scorer loads the new champion), and one whose view was
    deleted anyway computes the representations from its own weights (the same scores, slower)."""
    from marn.features.representations import delete_item_representations, serves_representations

    decision = GateDecision(**evaluation["gate"])
    replaced: set[str] = set()

    def publish(staged: RegisteredModel) -> dict[str, Any]:
        if not serves_representations(staged.model):
            return {}
        current = champion(registry_dir(cfg), staged.model)
        replaced.update([current.version] if current is not None else [])
        return {"item_representations": publish_item_representations(staged.checkpoint, cfg, staged.version)}

    registered = register_model(registry_dir(cfg), run_dir, data_dir, decision, before_champion=publish)
    out: dict[str, Any] = {
        "model": registered.model,
        "version": registered.version,
        "path": str(registered.path.resolve()),
    }
    if serves_representations(registered.model):
        out["item_representations"] = registered.card["item_representations"]
        out["deleted_representations"] = delete_item_representations(
            work_path(cfg, cfg.feast.repo_dir, "feast"), registered.model, {registered.version, *replaced}
        )
    return out


def publish_item_representations(checkpoint: Path, cfg: Config, version: str | None = None) -> int:
    """The time-invariant part of rep = s + c ([s_rest; c_rest], every modality but the statistics) for
    every catalogue item, written to the Feast view of this model ``version`` (default: the registry
    version of ``checkpoint``), which the version's MARN scorer reads online; the scorer adds each item's
    current statistics at request time (``MARN.represent_from_static``). Returns the number of items."""
    from datetime import UTC, datetime

    import torch

    from marn.features.representations import write_item_representations
    from marn.train import load_trained

    trained = load_trained(checkpoint)
    model = trained.model
    item_ids = list(trained.catalog.items.values)  # item_ids[i] has code i + 1; code 0 is padding
    codes = torch.arange(1, len(item_ids) + 1)
    with torch.no_grad():
        reps = torch.cat([model.static_parts(chunk) for chunk in codes.split(1024)])  # (n_items, 2D)
    write_item_representations(
        work_path(cfg, cfg.feast.repo_dir, "feast"),
        item_ids,
        reps.numpy(),
        datetime.now(UTC),
        model=trained.name,
        version=version if version is not None else registered_version(checkpoint),
    )
    return len(item_ids)


def deploy_stage(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """The serving plan: each A/B arm's champion version and its traffic weight, as the serve app reads it.

    Starting Ray Serve belongs to the serving stage (serve/); this writes the plan it loads.
    """
    arms = {}
    for name in (cfg.pipeline.model, cfg.pipeline.baseline):
        current = champion(registry_dir(cfg), name)
        if current is None:
            raise FileNotFoundError(f"no registered {name!r} model in {registry_dir(cfg)}: nothing to deploy")
        arms[name] = {"version": current.version, "checkpoint": str(current.checkpoint.resolve())}
    weight = 1.0 / len(arms)
    plan = {"arms": {name: {**arm, "weight": weight} for name, arm in arms.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SERVE_CONFIG).write_text(yaml.safe_dump(plan, sort_keys=False))
    return plan


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return _without_none(json.loads(json.dumps(d, default=str)))


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    """KFP parameters and artifact metadata cannot hold null: leave such keys out."""
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


# -- artifact level: what the KFP components call (config as YAML text, artifacts as paths) --------------


def write_dataset_ref(artifact: str | Path, data_dir: str | Path) -> dict[str, Any]:
    """A Dataset artifact that points at a data directory and pins its content (a sha256 per table).

    The tables stay where they are (a PVC or bucket in the cluster); the hash lets a later stage notice
    that the directory changed under it.
    """
    from marn.registry import data_snapshot

    artifact = Path(artifact)
    artifact.mkdir(parents=True, exist_ok=True)
    snapshot = data_snapshot(data_dir)
    (artifact / DATASET_REF).write_text(json.dumps(snapshot, indent=2) + "\n")
    return snapshot


def read_dataset_ref(artifact: str | Path) -> Path:
    ref = Path(artifact) / DATASET_REF
    if not ref.exists():
        raise FileNotFoundError(f"{artifact}: not a dataset artifact (no {DATASET_REF})")
    return Path(json.loads(ref.read_text())["data_dir"])


def run_validate(config: str, data_dir: str, dataset: str, report: str) -> dict[str, Any]:
    summary = validate_stage(Path(data_dir), _cfg(config), Path(report))
    return {**summary, "data_version": write_dataset_ref(dataset, data_dir)["version"]}


def run_embed(config: str, dataset: str, embedded: str) -> dict[str, Any]:
    data_dir = read_dataset_ref(dataset)
    summary = embed_stage(data_dir, _cfg(config))
    return {**summary, "data_version": write_dataset_ref(embedded, data_dir)["version"]}


def run_features(config: str, dataset: str, samples: str) -> dict[str, Any]:
    return features_stage(read_dataset_ref(dataset), _cfg(config), Path(samples))


def run_courier(config: str, dataset: str, samples: str, pretrained: str) -> dict[str, Any]:
    """The courier task: trains only when embed.method is courier; either way ``pretrained`` points at the
    same data directory, so tune and train (which read it) start after this task."""
    cfg = _cfg(config)
    data_dir = read_dataset_ref(dataset)
    if cfg.embed.method != "courier":
        log.info("courier: embed.method is %r, nothing to train", cfg.embed.method)
        summary: dict[str, Any] = {"method": cfg.embed.method, "trained": False}
    else:
        summary = {"method": "courier", "trained": True, **courier_stage(data_dir, cfg, Path(samples))}
    return {**summary, "data_version": write_dataset_ref(pretrained, data_dir)["version"]}


def run_tune(config: str, dataset: str, samples: str, trials: str) -> dict[str, Any]:
    return tune_stage(read_dataset_ref(dataset), Path(samples), _cfg(config), Path(trials))


def run_train(config: str, dataset: str, samples: str, model_name: str, params: dict, model: str) -> dict:
    return train_stage(
        read_dataset_ref(dataset), Path(samples), _cfg(config), model_name, params, Path(model)
    )


def run_evaluate(config: str, samples: str, model: str) -> dict[str, Any]:
    return evaluate_stage(Path(model), Path(samples), _cfg(config))


def run_register(config: str, dataset: str, model: str, evaluation: dict) -> dict[str, Any]:
    """Register when the gate passed; otherwise record that the champion stays."""
    if not evaluation["gate"]["passed"]:
        return {"registered": False, "reason": evaluation["gate"]["reason"]}
    return {
        "registered": True,
        **register_stage(Path(model), read_dataset_ref(dataset), evaluation, _cfg(config)),
    }


def run_deploy(config: str, deployment: str) -> dict[str, Any]:
    return deploy_stage(_cfg(config), Path(deployment))


def _cfg(text: str) -> Config:
    from marn.config import parse_config

    return parse_config(text, "<pipeline parameter config>")
