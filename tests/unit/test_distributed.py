"""The parts of Ray Train and Ray Tune support that run without Ray: resumable ``fit``, DDP inside ``fit``,
sharding, checkpoint files, prebuilt samples, tuned values applied through ``Config.with_overrides`` (the
schedule's horizon, ``marn train --params``) and the checks made before Ray starts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from typer.testing import CliRunner

from marn.config import Config, ConfigError, SynthConfig, TrainConfig, load_config
from marn.data.samples import build_samples
from marn.data.schema import Dataset, read_dataset
from marn.data.synth import synthesize
from marn.distributed import read_checkpoint, shard, train_distributed, write_checkpoint
from marn.models import build_model
from marn.train import FitState, fit, prepare_inputs, save_run, seed_everything, train_model
from marn.tune import (
    read_tune_overrides,
    search_horizon,
    trial_config,
    tuned_overrides,
)


def _without_seconds(history):
    return [replace(r, seconds=0.0) for r in history]


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons need one intra-op thread: with two, float sums may add in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("distributed")
    synthesize(root / "data", SynthConfig(users=60, items=80, seed=3))
    return root / "data"


@pytest.fixture(scope="module")
def dataset(data_dir) -> Dataset:
    return read_dataset(data_dir)


@pytest.fixture
def cfg(tmp_path) -> Config:
    glove = tmp_path / "glove.txt"  # the 400k-word default is slow to load
    glove.write_text("red 0.1 0.2 0.3\nblue -0.1 0.0 0.2\n")
    return load_config(
        None,
        {
            "train": {"model": "lr", "epochs": 2, "batch_size": 128},
            "features": {"image": "pixels", "image_pixels": 4, "word_vectors": str(glove)},
        },
    )


def test_a_resumed_fit_repeats_the_uninterrupted_run_exactly(tiny_world, tmp_path):
    # DIN has dropout (the global RNG) and Dice running statistics (buffers): both must survive a resume.
    model_cfg = tiny_world.model_cfg.model_copy(update={"dropout": 0.3})
    train_cfg = TrainConfig(model="din", epochs=4, batch_size=64, patience=10, seed=5)

    def new_model():
        seed_everything(train_cfg.seed)
        return build_model("din", tiny_world.catalog, tiny_world.features, model_cfg)

    states: list[FitState] = []
    best, history = fit(
        new_model(),
        tiny_world.train,
        tiny_world.valid,
        train_cfg,
        on_epoch=lambda result, state: states.append(state),
        show_progress=False,
    )
    assert [s.epoch for s in states] == [1, 2, 3, 4] and states[-1].history == tuple(history)

    # What a checkpoint holds after epoch 2, through the file format Ray Train checkpoints use.
    torch.save(states[1].to_dict(), tmp_path / "state.pt")
    saved = FitState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    seed_everything(99)  # a restarted worker's RNG is anywhere: the saved state must set it
    resumed_best, resumed_history = fit(
        new_model(), tiny_world.train, tiny_world.valid, train_cfg, show_progress=False, resume=saved
    )
    assert _without_seconds(resumed_history) == _without_seconds(history)
    assert _same_state(resumed_best, best)


def test_resuming_from_the_epoch_that_stopped_the_run_trains_nothing(tiny_world):
    train_cfg = TrainConfig(model="lr", epochs=5, lr=1e-12, patience=1)  # no AUC gain: stops after epoch 2
    model = build_model("lr", tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    states: list[FitState] = []
    fit(model, tiny_world.train, tiny_world.valid, train_cfg, lambda r, s: states.append(s), False)
    assert [s.epoch for s in states] == [1, 2] and states[-1].stale == 1

    called = []
    best, history = fit(
        model, tiny_world.train, tiny_world.valid, train_cfg, lambda r, s: called.append(r), False, states[-1]
    )
    assert called == [] and len(history) == 2 and _same_state(best, states[-1].best_state)


def test_a_saved_fit_state_with_missing_fields_is_a_clear_error():
    with pytest.raises(ValueError, match=r"missing .*'optimizer_state'"):
        FitState.from_dict({"epoch": 1, "model_state": {}})


def test_fit_through_ddp_matches_plain_fit_and_returns_unwrapped_weights(tiny_world, tmp_path):
    train_cfg = TrainConfig(model="din", epochs=2, batch_size=64)

    def new_model():
        seed_everything(train_cfg.seed)
        return build_model("din", tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)

    plain_best, plain_history = fit(
        new_model(), tiny_world.train, tiny_world.valid, train_cfg, show_progress=False
    )
    # A one-process gloo group: DDP and the buffer broadcast run for real, without Ray.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        wrapped = DistributedDataParallel(
            new_model(), find_unused_parameters=True, forward_sync_buffers=False
        )
        ddp_best, ddp_history = fit(
            wrapped, tiny_world.train, tiny_world.valid, train_cfg, show_progress=False
        )
    finally:
        torch.distributed.destroy_process_group()
    assert not any(k.startswith("module.") for k in ddp_best)
    assert ddp_best.keys() == plain_best.keys()
    assert all(torch.allclose(ddp_best[k].float(), plain_best[k].float(), atol=1e-6) for k in plain_best)
    assert [r.valid["auc"] for r in ddp_history] == pytest.approx([r.valid["auc"] for r in plain_history])


def test_shards_are_equal_disjoint_seeded_and_mix_labels(tiny_world):
    data = tiny_world.train
    world = 3
    shards = [shard(data, rank, world, seed=1) for rank in range(world)]
    assert {len(s) for s in shards} == {len(data) // world}  # DDP: every rank takes the same steps
    rows = [tuple(map(tuple, s.tensors["hist_items"].tolist())) for s in shards]
    keys = [
        set(zip(s.users.tolist(), s.tensors["item"].tolist(), r, strict=True))
        for s, r in zip(shards, rows, strict=True)
    ]
    assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])
    for s in shards:  # samples come as positive/negative pairs: a plain stride would split by label
        assert 0.3 < s.tensors["label"].mean().item() < 0.7
    assert torch.equal(shard(data, 1, world, seed=1).tensors["item"], shards[1].tensors["item"])
    assert not torch.equal(shard(data, 1, world, seed=2).tensors["item"], shards[1].tensors["item"])
    with pytest.raises(ValueError, match="rank 3 outside a world of 3"):
        shard(data, 3, world, seed=1)
    with pytest.raises(ValueError, match="cannot be shared by"):
        shard(data, 0, len(data) + 1, seed=1)


def test_checkpoint_files_round_trip(tiny_world, tmp_path):
    from ray.train import Checkpoint  # a path wrapper: no Ray is started

    model = build_model("lr", tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    states: list[FitState] = []
    fit(
        model, tiny_world.train, tiny_world.valid, TrainConfig(epochs=1), lambda r, s: states.append(s), False
    )
    write_checkpoint(tmp_path, states[0], resumed_from=[3])
    state, resumed_from = read_checkpoint(Checkpoint.from_directory(str(tmp_path)))
    assert resumed_from == [3] and state.epoch == 1 and state.history == states[0].history
    assert _same_state(state.best_state, states[0].best_state)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a marn training checkpoint"):
        read_checkpoint(Checkpoint.from_directory(str(tmp_path / "empty")))


def test_train_model_uses_prebuilt_samples(dataset, cfg, tmp_path):
    built = train_model(dataset, cfg, tmp_path / "built", show_progress=False).metrics
    given = build_samples(dataset, cfg.samples)
    prebuilt = train_model(dataset, cfg, tmp_path / "given", show_progress=False, samples=given).metrics
    assert prebuilt["auc"] == built["auc"] and prebuilt["samples"] == built["samples"]
    fewer = type(given)(given.train.slice(0, 100), given.valid, given.test)
    assert (
        train_model(dataset, cfg, tmp_path / "fewer", False, samples=fewer).metrics["samples"]["train"] == 100
    )


def test_save_run_adds_extra_keys_and_refuses_an_empty_history(dataset, cfg, tmp_path):
    inputs = prepare_inputs(dataset, cfg)
    model = build_model("lr", inputs.catalog, inputs.features, cfg.model)
    best, history = fit(model, inputs.train, inputs.valid, cfg.train, show_progress=False)
    result = save_run(model, best, history, inputs, cfg, tmp_path, 0.0, extra={"workers": 2})
    assert json.loads(result.metrics_path.read_text())["workers"] == 2
    with pytest.raises(ValueError, match="no epoch was trained"):
        save_run(model, best, [], inputs, cfg, tmp_path, 0.0)


def test_tuned_values_apply_through_with_overrides_with_the_search_horizon(cfg):
    tuned = cfg.with_overrides(tuned_overrides({"lambda0": 0.2, "lr": 0.05}, search_horizon(cfg)))
    assert (tuned.model.lambda0, tuned.train.lr) == (0.2, 0.05)
    assert tuned.train.lambda_horizon_epochs == cfg.tune.max_epochs
    assert (cfg.model.lambda0, cfg.train.lr, cfg.train.lambda_horizon_epochs) == (0.05, 0.1, None)
    assert tuned.features == cfg.features and tuned.train.model == cfg.train.model
    with pytest.raises(ConfigError, match="expected exactly the tuned keys"):
        tuned_overrides({"lambda0": 0.2, "learning_rate": 0.05}, 2)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        cfg.with_overrides(tuned_overrides({"lambda0": 0.2, "lr": 0.0}, 2))


def test_the_pipeline_applies_tuned_values_to_the_searched_model_only(cfg):
    from marn.stages import training_overrides

    cfg = cfg.with_overrides({"tune.model": "marn"})
    best = {"lambda0": 0.2, "lr": 0.05}
    assert training_overrides(cfg, "marn", best) == tuned_overrides(best, cfg.tune.max_epochs)
    assert training_overrides(cfg, "dupn", best) == {}  # the baseline keeps the configured values
    assert training_overrides(cfg.with_overrides({"pipeline.tune": False}), "marn", best) == {}


def test_the_old_patchers_are_gone():
    import marn.stages
    import marn.tune

    assert not hasattr(marn.tune, "apply_best")
    assert not hasattr(marn.stages, "with_params")
    paper = Path(__file__).resolve().parents[2] / "benchmarks" / "paper.py"
    assert "def with_lambda0" not in paper.read_text() and "model_validate" not in paper.read_text()


def _schedule(tiny_world, train_cfg: TrainConfig) -> list[float]:
    """The lambda schedule's p at every training step of ``fit`` with ``train_cfg``."""
    seed_everything(train_cfg.seed)
    model = build_model(train_cfg.model, tiny_world.catalog, tiny_world.features, tiny_world.model_cfg)
    seen: list[float] = []

    def record(module, args, kwargs):
        if module.training:
            seen.append(kwargs["progress"])

    model.register_forward_pre_hook(record, with_kwargs=True)
    fit(model, tiny_world.train, tiny_world.valid, train_cfg, show_progress=False)
    return seen


def test_a_value_tuned_over_2_epochs_is_trained_over_3_with_the_same_schedule(tiny_world):
    cfg = load_config(
        None,
        {
            "train": {"model": "lr", "epochs": 3, "batch_size": 256, "patience": 5},
            "tune": {"model": "lr", "max_epochs": 2, "grace_epochs": 1},
        },
    )
    best = {"lambda0": 0.2, "lr": 0.05}
    trial = trial_config(cfg, best)
    assert (trial.train.epochs, trial.train.lambda_horizon_epochs) == (2, 2)
    tuned = _schedule(tiny_world, trial.train)
    trained = _schedule(tiny_world, cfg.with_overrides(tuned_overrides(best, search_horizon(cfg))).train)
    assert len(trained) == len(tuned) * 3 // 2  # three epochs of the two's steps each
    assert trained[: len(tuned)] == tuned and tuned[0] == 0.0 and tuned[-1] < 1.0
    assert trained[len(tuned) :] == [1.0] * (len(trained) - len(tuned))  # the schedule is done: p stays 1
    untuned = _schedule(tiny_world, cfg.with_overrides({"train.lr": 0.05}).train)  # horizon: its 3 epochs
    assert untuned[1] < tuned[1]


def _tune_json(path, cfg: Config, **changes) -> None:
    """A tune.json as ``marn tune`` writes it, for ``cfg``'s model."""
    best = {"lambda0": 0.3, "lr": 0.07}
    report = {
        "model": cfg.train.model,
        "best": best,
        "search": cfg.tune.model_dump(mode="json"),
        "model_config": cfg.model.model_dump(mode="json"),
        "lambda_horizon_epochs": 2,
        "overrides": tuned_overrides(best, 2),
        **changes,
    }
    path.write_text(json.dumps(report))


def test_train_params_applies_a_tune_result_and_refuses_what_is_not_one(data_dir, cfg, tmp_path):
    import cli.main
    from marn.train import load_trained

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    tuned = tmp_path / "tune.json"
    _tune_json(tuned, cfg)
    args = ["train", "--model", "lr", "--data", str(data_dir), "--workers", "1", "--config", str(config)]
    result = CliRunner().invoke(cli.main.app, [*args, "--out", str(tmp_path / "run"), "--params", str(tuned)])
    assert result.exit_code == 0, result.output
    trained = load_trained(tmp_path / "run" / "model.pt").config
    assert (trained["model"]["lambda0"], trained["train"]["lr"]) == (0.3, 0.07)
    assert trained["train"]["lambda_horizon_epochs"] == 2

    bad = tmp_path / "bad.json"
    for content, message in (
        ("not json", "not a tune result"),
        (json.dumps({"metric": "valid_auc"}), "not a tune result"),
    ):
        bad.write_text(content)
        result = CliRunner().invoke(cli.main.app, [*args, "--out", str(tmp_path / "x"), "--params", str(bad)])
        output = " ".join(result.output.split())  # rich wraps long lines
        assert result.exit_code == 2 and message in output, output
    _tune_json(bad, cfg, overrides={"model.lambda_zero": 0.3})
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.lambda_zero'"):
        cfg.with_overrides(read_tune_overrides(bad, cfg))
    _tune_json(bad, cfg, model="marn")
    with pytest.raises(ConfigError, match="searched marn"):
        read_tune_overrides(bad, cfg)
    assert not (tmp_path / "x").exists()  # nothing trained on a refused file


def test_bad_input_fails_before_ray_starts(dataset, cfg, tmp_path):
    import ray

    with pytest.raises(ConfigError, match=r"tune\.lambda0_range: .*0 < low <= high"):
        cfg.with_overrides({"tune.lambda0_range": (0.0, 1.0)})  # a config validator now, not tune.py's
    unknown = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": "nope"})})
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        train_distributed(dataset, unknown, tmp_path)
    crowd = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"workers": 100_000})})
    with pytest.raises(ValueError, match="cannot be shared by 100000 workers"):
        train_distributed(dataset, crowd, tmp_path)
    assert not ray.is_initialized()
