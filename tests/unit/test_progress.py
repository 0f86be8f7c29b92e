"""Progress on the console (marn.progress) and the training-curve PNG (marn.curves), without Ray.

The Ray paths (the embed actor pool, Tune's driver callbacks, Ray Train's controller callback and the
driver's queue) run for real in tests/integration/test_embed_ray.py, test_ray_tune.py and test_ray_train.py.
"""

from __future__ import annotations

import io
import json
import pickle
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import count_points  # tests/ is on sys.path: pytest imports conftest from there
from PIL import Image
from rich.console import Console

import marn.embed.stage as stage
from marn.config import EmbedConfig, RayConfig, load_config
from marn.curves import CURVE, write_training_curve
from marn.data.files import content_hash
from marn.data.schema import Dataset, write_table
from marn.embed.cache import VectorCache, cache_identity
from marn.progress import epoch_line, epoch_rows, phase_bars
from marn.ray_progress import TrialTable
from marn.train import METRICS, train_model


def captured_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=140), out  # a file, not a terminal: plain lines


# ---------------------------------------------------------------------------------------------------------
# marn embed: items/s
# ---------------------------------------------------------------------------------------------------------


def test_embed_reports_hashing_progress_with_a_rate(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for k, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), color).save(images / f"{k}.png")
    write_table(
        tmp_path,
        "items",
        pd.DataFrame(
            {
                "item_id": ["i0", "i1", "i2", "i3"],
                "category_id": ["c"] * 4,
                "brand_id": ["b"] * 4,
                "shop_id": ["s"] * 4,
                "title": ["a", "b", "c", "d"],
                "image_uri": ["images/0.png", "images/1.png", "images/2.png", None],
                "first_seen": pd.Timestamp("2025-01-01", tz="UTC"),
            }
        ),
    )
    cfg = EmbedConfig(image_size=64)
    cache = VectorCache(tmp_path / "cache" / cache_identity(cfg.backbone, None, cfg.image_size), 1280)
    cache.add({content_hash(images / f"{k}.png"): np.zeros(1280, np.float32) for k in range(3)})

    @contextmanager
    def refuse(_cfg):
        raise AssertionError("everything was cached, yet Ray was started")
        yield

    monkeypatch.setattr(stage, "ray_session", refuse)
    glove = tmp_path / "glove.txt"
    glove.write_text("a 1 2\n")
    calls = []
    console, out = captured_console()
    with phase_bars(console) as bars:

        def progress(phase: str, done: int, total: int) -> None:
            calls.append((phase, done, total))
            bars(phase, done, total)

        stage.embed_items(
            tmp_path, cfg, RayConfig(), tmp_path / "cache", word_vectors=str(glove), progress=progress
        )

    assert calls == [("hash images", k, 4) for k in range(5)]  # the start, then one call per item
    text = out.getvalue()
    assert "hash images" in text and "4/4" in text and "items/s" in text
    assert "embed images" not in text  # nothing left for the actor pool


# ---------------------------------------------------------------------------------------------------------
# marn tune: the trial table
# ---------------------------------------------------------------------------------------------------------


def _trial(trial_id: str, lambda0: float, lr: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"lambda0": lambda0, "lr": lr})  # what Tune passes


def test_trial_table_prints_one_line_per_result_without_a_terminal():
    console, out = captured_console()
    a, b = _trial("a_00000", 0.5, 0.01), _trial("b_00001", 2.0, 0.1)
    with TrialTable(console) as table:
        table.on_trial_result(1, [a, b], a, {"epoch": 1, "valid_auc": 0.61})
        table.on_trial_result(2, [a, b], b, {"epoch": 1, "valid_auc": 0.58})
        table.on_trial_result(3, [a, b], a, {"epoch": 2, "valid_auc": 0.64})
        table.on_trial_complete(4, [a, b], a)
        table.on_trial_error(5, [a, b], b)
    lines = out.getvalue().splitlines()
    assert lines == table.lines
    assert lines[0] == "trial a_00000  lambda0 0.5  lr 0.01  epochs 1  valid AUC 0.6100  RUNNING"
    assert lines[2] == "trial a_00000  lambda0 0.5  lr 0.01  epochs 2  valid AUC 0.6400  RUNNING"
    assert lines[3].endswith("epochs 2  valid AUC 0.6400  TERMINATED")
    assert lines[4] == "trial b_00001  lambda0 2  lr 0.1  epochs 1  valid AUC 0.5800  ERROR"
    # Tune pickles the run config with its callbacks: the copy keeps the rows and drops the console
    copy = pickle.loads(pickle.dumps(table))
    assert copy.console is None and copy.rows == table.rows


def test_trial_table_is_a_live_table_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=True, color_system=None)
    trial = _trial("a_00000", 0.5, 0.01)
    with TrialTable(console) as table:
        table.on_trial_result(1, [trial], trial, {"epoch": 3, "valid_auc": 0.7})
    assert table.lines == []  # drawn, not printed line by line
    text = out.getvalue()
    for cell in ("Ray Tune trials", "lambda0", "valid AUC", "a_00000", "0.7000", "RUNNING"):
        assert cell in text


# ---------------------------------------------------------------------------------------------------------
# marn train --workers N: one line per epoch
# ---------------------------------------------------------------------------------------------------------


def test_epoch_rows_average_the_workers_train_loss():
    row = epoch_rows(
        [
            {"epoch": 2, "train_loss": 0.5, "valid_auc": 0.7, "seconds": 3.0},
            {"epoch": 2, "train_loss": 0.7, "valid_auc": 0.7, "seconds": 3.2},
        ]
    )
    assert row == {
        "epoch": 2,
        "train_loss": pytest.approx(0.6),
        "valid_auc": 0.7,
        "seconds": 3.0,
        "workers": 2,
    }
    assert epoch_line(row) == "epoch 2  train loss 0.6000  valid AUC 0.7000  3.0 s"
    assert epoch_line({"epoch": 1, "valid_auc": float("nan")}) == "epoch 1  train loss -  valid AUC -  - s"


# ---------------------------------------------------------------------------------------------------------
# the training-curve PNG
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epochs", [1, 4])
def test_training_curve_has_one_point_per_epoch_in_each_panel(tmp_path, epochs):
    history = [
        {"epoch": e, "train_loss": 0.7 - 0.05 * e, "valid_auc": 0.6 + 0.03 * e} for e in range(1, epochs + 1)
    ]
    path = write_training_curve(history, tmp_path / CURVE, "lr")
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    assert count_points(path) == 2 * epochs  # train loss and valid AUC


def test_training_curve_refuses_an_empty_history(tmp_path):
    with pytest.raises(ValueError, match="empty history"):
        write_training_curve([], tmp_path / CURVE, "lr")


def test_train_model_writes_the_curve_next_to_metrics(tmp_path):
    rng = np.random.default_rng(0)
    t0 = pd.Timestamp("2025-01-01", tz="UTC")
    events = pd.DataFrame(
        [
            (f"u{u}", f"i{int(rng.integers(0, 30))}", "click", t0 + pd.Timedelta(hours=u * 10 + k))
            for u in range(60)
            for k in range(6)
        ],
        columns=["user_id", "item_id", "behavior", "ts"],
    )
    items = pd.DataFrame(
        {"item_id": [f"i{i}" for i in range(30)], "category_id": "c", "brand_id": None, "shop_id": None}
    )
    cfg = load_config(None, {"train": {"model": "lr", "epochs": 3, "patience": 5, "batch_size": 64}})
    train_model(Dataset(events=events, items=items), cfg, tmp_path, show_progress=False)
    history = json.loads((tmp_path / METRICS).read_text())["history"]
    assert len(history) == 3
    assert count_points(tmp_path / CURVE) == 2 * len(history)
