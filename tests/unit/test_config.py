"""Typed config: the shipped YAML loads, typos fail with the key and file, overrides merge, and
``Config.with_overrides`` (dotted keys, every validator run) is the one way tuned values enter."""

import re
from pathlib import Path

import pytest

from marn.config import Config, ConfigError, dump_config, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_configs_load_and_local_is_sized_for_two_cores():
    local = load_config(REPO / "configs" / "local.yaml")
    cluster = load_config(REPO / "kustomize" / "base" / "config" / "cluster.yaml")
    assert local.ray.address is None and local.ray.num_cpus == 2 and local.feast.online_store == "sqlite"
    assert local.tune.cpus_per_trial * 2 <= local.ray.num_cpus  # two trials fit at once
    assert local.distributed.workers * local.distributed.cpus_per_worker <= local.ray.num_cpus
    assert cluster.ray.address == "auto" and cluster.feast.online_store == "redis"
    assert cluster.embed.backbone == "vgg16"  # the paper's backbone
    assert cluster.model == Config().model  # the paper's widths


def test_misspelled_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("synth:\n  usres: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "synth.usres" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_and_range_are_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: zero\n  lr: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epochs" in str(err.value) and "train.lr" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(tmp_path / "broken.yaml")


def test_overrides_merge_into_nested_sections(tmp_path):
    cfg = load_config(REPO / "configs" / "local.yaml", {"synth": {"users": 5}, "train": {"epochs": 1}})
    local = load_config(REPO / "configs" / "local.yaml")
    assert cfg.synth.users == 5 and cfg.synth.items == local.synth.items and cfg.train.epochs == 1
    assert cfg.train.batch_size == local.train.batch_size
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epochz'"):
        load_config(None, {"train": {"epochz": 1}})


def test_dumped_config_is_one_line_and_reads_back_equal():
    cfg = load_config(REPO / "kustomize" / "base" / "config" / "cluster.yaml")
    text = dump_config(cfg)
    assert "\n" not in text  # KFP copies parameter defaults into a comment header
    assert parse_config(text) == cfg


def test_with_overrides_sets_dotted_keys_and_leaves_the_rest():
    cfg = Config()
    tuned = cfg.with_overrides({"model.lambda0": 0.2, "train.lr": 0.05, "serve.canary.margin": 0.02})
    assert (tuned.model.lambda0, tuned.train.lr, tuned.serve.canary.margin) == (0.2, 0.05, 0.02)
    assert tuned.model_dump(exclude={"model", "train", "serve"}) == cfg.model_dump(
        exclude={"model", "train", "serve"}
    )
    assert (cfg.model.lambda0, cfg.train.lr) == (0.05, 0.1)  # a copy: the original is untouched


@pytest.mark.parametrize("key", ["model.lamda0", "train.lr.low", "lr", "", "model."])
def test_with_overrides_names_an_unknown_key(key):
    with pytest.raises(ConfigError, match=f"unknown config key '{re.escape(key)}'"):
        Config().with_overrides({key: 0.1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lr": 0.0}, r"train\.lr: Input should be greater than 0"),
        ({"train.lambda_horizon_epochs": 0}, r"train\.lambda_horizon_epochs: Input should be greater"),
        ({"tune.lambda0_range": (0.0, 1.0)}, r"tune\.lambda0_range: .*0 < low <= high"),
        ({"tune.lr_range": (0.3, 0.1)}, r"tune\.lr_range: .*0 < low <= high"),
        ({"tune.grace_epochs": 4}, r"grace_epochs=4 exceeds max_epochs=3"),
        ({"serve.canary.steps": (0.5, 0.25)}, r"steps must be increasing"),  # a field validator runs
        ({"model": {"lambda0": 0.1, "typo": 1}}, r"unknown key 'model\.typo'"),  # a section set whole
    ],
)
def test_with_overrides_runs_every_validator(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config().with_overrides(overrides)


def test_tune_ranges_are_checked_when_a_file_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tune:\n  lr_range: [0.3, 0.1]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: invalid config\n  tune\.lr_range: .*0 < low <= high"):
        load_config(path)
