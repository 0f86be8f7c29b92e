"""Shared pytest fixtures."""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from marn.config import FeaturesConfig, ModelConfig, load_config
from marn.curves import POINT_COLOR
from marn.data.files import write_parquet_atomic
from marn.data.item_features import ItemFeatures, build_item_features
from marn.data.samples import build_samples
from marn.data.schema import IMAGE_EMBEDDINGS, Dataset, read_dataset
from marn.data.stats import earliest_time, item_stat_table
from marn.data.synth import synthesize
from marn.data.tensors import EncodedSamples, ItemCatalog, encode_samples, fit_statistics
from marn.embed.cache import list_column
from marn.models.layers import ItemStates

# /work/main/tests/conftest.py -> /work/shared: the shared folder sits beside the repository checkout.
_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared research-data folder (holding ``datasets/`` and ``models/``), never copied into the repo.

    Defaults to ``shared/`` beside the repository; override with the environment variable MARN_SHARED_DIR.
    Tests that need it are skipped, with the path tried, when it is absent.
    """
    path = Path(os.environ.get("MARN_SHARED_DIR", _DEFAULT_SHARED)).expanduser()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}; set MARN_SHARED_DIR")
    return path


@dataclass(frozen=True)
class TinyWorld:
    """A small synthetic dataset turned into everything a model needs: catalogue, item features, samples."""

    catalog: ItemCatalog
    features: ItemFeatures
    model_cfg: ModelConfig
    train: EncodedSamples
    valid: EncodedSamples
    item_stats: pd.DataFrame  # marn.data.stats.item_stat_table: point-in-time statistics of any item


# Small widths so every model trains in well under a second per step on two cores.
TINY_MODEL = {
    "modality_dim": 16,
    "rep_dim": 16,
    "sequence_dim": 16,
    "title_filters": 4,
    "attention_hidden": [8],
    "hidden": [16, 8],
}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    """Synthetic data (150 users, 80 items) with all four modalities; word vectors from a tiny GloVe file
    so the test does not load the 400k-word default."""
    root = tmp_path_factory.mktemp("tiny_world")
    cfg = load_config(None, {"synth": {"users": 150, "items": 80, "events_per_user": 12, "seed": 3}})
    synthesize(root / "data", cfg.synth)
    glove = root / "glove.txt"
    glove.write_text("red 0.1 0.2 0.3 0.4\nblue -0.1 0.0 0.2 0.1\nwool 0.3 -0.2 0.0 0.5\n")
    dataset = read_dataset(root / "data")
    catalog = ItemCatalog.from_items(dataset.items)
    features_cfg = FeaturesConfig(image="pixels", image_pixels=4, word_vectors=str(glove), title_len=8)
    model_cfg = ModelConfig.model_validate(TINY_MODEL)
    samples = build_samples(dataset, cfg.samples)
    statistics = fit_statistics(samples.train, model_cfg.stats_buckets)
    features = build_item_features(dataset, catalog, features_cfg, statistics)
    train, valid = (encode_samples(samples.split(s), catalog, 12, statistics) for s in ("train", "valid"))
    item_stats = item_stat_table(dataset, earliest_time(dataset))
    return TinyWorld(catalog, features, model_cfg, train, valid, item_stats)


def item_states(features: ItemFeatures, codes: torch.Tensor, seed: int = 0) -> ItemStates:
    """Items with random (valid) statistic codes: what a batch's distinct item states look like."""
    generator = torch.Generator().manual_seed(seed)
    statistics = features.statistics
    stats = torch.stack(
        [
            torch.randint(0, b + 1, (len(codes), statistics.n_stats), generator=generator)
            for b in statistics.buckets
        ],
        dim=-1,
    )  # (U, F, G)
    return ItemStates(codes, stats.to(torch.int16))


# A whole-pipeline world small enough for a test: every stage runs, each in seconds.
TINY_PIPELINE: dict[str, Any] = {
    "synth": {"users": 60, "items": 50, "image_size": 16},
    "samples": {"max_history": 10},
    "train": {"epochs": 1},
    "features": {"title_len": 8},
    "model": TINY_MODEL,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_settings() -> Callable[[Path], dict[str, Any]]:
    """``make(work_dir)`` -> config settings of TINY_PIPELINE with their own work dir and free serve ports
    (tests never collide with a service a developer left running on 8000)."""

    def make(work_dir: Path) -> dict[str, Any]:
        settings = copy.deepcopy(TINY_PIPELINE)
        settings["paths"] = {"work_dir": str(work_dir)}
        settings["serve"] = {"port": free_port(), "dashboard_port": free_port()}
        return settings

    return make


def count_points(png: Path) -> int:
    """Epoch markers in a training-curve PNG (marn.curves): connected blobs of POINT_COLOR."""
    from PIL import Image
    from scipy import ndimage

    with Image.open(png) as image:
        assert image.format == "PNG"
        rgb = np.asarray(image.convert("RGB")).astype(int)
    target = np.array([int(POINT_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    _, blobs = ndimage.label(np.abs(rgb - target).sum(axis=-1) < 60)
    return blobs


NO_POSTER = 3  # items left out of the poster table by write_posters


def write_posters(data_dir: Path, dataset: Dataset, width: int = 24) -> None:
    """Seeded stand-ins for the backbone's vectors; the first NO_POSTER items (by id) have none."""
    items = sorted(dataset.items["item_id"].astype(str))[NO_POSTER:]
    vectors = np.random.default_rng(0).normal(size=(len(items), width)).astype(np.float32)
    table = pa.table(
        {
            "item_id": pa.array(items, pa.string()),
            "embedding": list_column(vectors, width),
            "content_hash": pa.array([f"hash-{i}" for i in items], pa.string()),
            "backbone": pa.array(["stand-in"] * len(items), pa.string()),
        }
    )
    write_parquet_atomic(table, Path(data_dir) / IMAGE_EMBEDDINGS)


LOCAL_PIPELINE_BOUND_S = 900  # the whole local pipeline on a tiny world, well above its few minutes


def run_local_pipeline(tmp_path: Path, data: Path, settings: dict[str, Any]) -> Path:
    """``marn pipeline run --local`` on ``data`` with ``settings`` (written to ``tmp_path/config.yaml``) in a
    subprocess bounded in time; asserts it succeeded and returns the KFP run directory under the settings'
    work dir."""
    import subprocess
    import sys
    import time

    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "COLUMNS": "200"}
    marn = Path(sys.executable).with_name("marn")
    started = time.monotonic()
    result = subprocess.run(
        [str(marn), "pipeline", "run", "--local", "--data", str(data), "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=LOCAL_PIPELINE_BOUND_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - started < LOCAL_PIPELINE_BOUND_S
    return next((Path(settings["paths"]["work_dir"]) / "kfp").glob("marn-ctr-*"))
