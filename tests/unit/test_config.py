"""Typed config: the shipped YAML loads, typos fail with the key and file, overrides merge."""

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
