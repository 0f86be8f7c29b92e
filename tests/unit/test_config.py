"""Typed config: the shipped YAML loads, typos fail with the key and file, overrides merge."""

from pathlib import Path

import pytest

from marn.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_local_config_is_the_built_in_default():
    assert load_config(REPO / "configs" / "local.yaml") == Config()


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
    assert cfg.synth.users == 5 and cfg.synth.items == Config().synth.items and cfg.train.epochs == 1
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epochz'"):
        load_config(None, {"train": {"epochz": 1}})
