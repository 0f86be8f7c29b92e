"""One default for the commands: without --config, `marn` reads exactly configs/local.yaml, shipped inside
the package (so an installed wheel finds it), and the service it starts reads the same file. The Python
field defaults (`Config()`, `load_config(None)`) are the paper's sizes, and differ where config.py says."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from typer.testing import CliRunner

import cli.main
import serve.control
from marn.cli import load_cli_config
from marn.config import Config, default_config_path, load_config

REPO = Path(__file__).resolve().parents[2]


def test_commands_without_config_read_exactly_configs_local_yaml():
    assert load_cli_config(None) == load_config(REPO / "configs" / "local.yaml")


def test_the_default_is_package_data_and_the_repo_file_is_the_same_file():
    shipped = default_config_path()
    assert shipped.is_file() and shipped.parent.parent == (REPO / "marn").resolve()
    assert (REPO / "configs" / "local.yaml").resolve() == shipped  # one file, not a copy that can drift
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = shipped.relative_to((REPO / "marn").resolve()).as_posix()
    assert any(fnmatch.fnmatch(relative, glob) for glob in package_data["marn"]), package_data


def test_python_defaults_are_the_papers_sizes_as_documented():
    """config.py's docstring names these differences; if one goes away, the docstring must change too."""
    local, paper = load_cli_config(None), Config()
    assert load_config(None) == paper
    assert (local.samples.max_history, paper.samples.max_history) == (20, 50)
    assert (local.model.modality_dim, local.model.rep_dim) == (64, 128)
    assert (paper.model.modality_dim, paper.model.rep_dim, paper.model.sequence_dim) == (96, 256, 128)
    assert paper.model.title_filters == 100
    assert (local.train.epochs, paper.train.epochs) == (3, 5)
    assert (local.distributed.workers, paper.distributed.workers) == (2, 1)


def test_serve_up_without_config_hands_the_service_the_same_file(monkeypatch):
    started: list[str | None] = []

    def up(cfg, config_path, say):
        started.append(config_path)
        raise serve.control.ServeError("stop here: only the arguments are checked")

    monkeypatch.setattr(serve.control, "up", up)
    result = CliRunner().invoke(cli.main.app, ["serve", "up"])
    assert result.exit_code == 1 and "stop here" in result.output
    assert started == [str(default_config_path())]
