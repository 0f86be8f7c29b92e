"""Typed configuration. Every section rejects unknown keys, so a typo fails loudly with the key and file.

``configs/local.yaml`` is the embedded default; ``load_config(None)`` returns the same values built in.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Strict):
    work_dir: Path = Path(".marn")  # all local outputs (datasets, runs, registry) live under here


class SynthConfig(Strict):
    users: int = Field(2000, ge=1)
    items: int = Field(1000, ge=2)
    events_per_user: float = Field(18.0, gt=0)  # mean sequence length; lengths vary per user
    seed: int = 7
    image_size: int = Field(32, ge=8)  # side of each generated PNG, in pixels
    start: datetime = datetime.fromisoformat("2025-01-01T00:00:00+00:00")
    days: int = Field(60, ge=1)  # span of event times
    chunk_users: int = Field(50_000, ge=1)  # users generated per chunk; bounds memory at 10M+ events


class SamplesConfig(Strict):
    max_history: int = Field(50, ge=1)  # DIN truncates to the most recent behaviours
    min_events: int = Field(4, ge=3)  # train, validation and test each need one step of the sequence
    seed: int = 7  # negative sampling


class ValidateConfig(Strict):
    earliest_ts: datetime = datetime.fromisoformat("1990-01-01T00:00:00+00:00")
    future_slack_s: int = Field(300, ge=0)  # clock skew allowed before a timestamp counts as "future"
    max_bad_examples: int = Field(5, ge=1)  # bad rows shown per failed expectation


class TrainConfig(Strict):
    model: str = "lr"
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(256, ge=1)  # paper: 32 on Amazon, 1024 on Taobao
    lr: float = Field(0.1, gt=0)  # paper: AdaGrad, learning rate 0.1
    patience: int = Field(2, ge=1)  # epochs without validation-AUC gain before stopping
    seed: int = 7


class Config(Strict):
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig = SynthConfig()
    samples: SamplesConfig = SamplesConfig()
    validation: ValidateConfig = ValidateConfig()
    train: TrainConfig = TrainConfig()


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and every bad key."""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (None: built-in defaults) and apply nested ``overrides`` on top."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(source, err)) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
