"""The local pipeline with embed.method courier: COURIER trains between features and tune/train, the
registered model was trained on its vectors (issue 19 item 1), and it serves a new item through the head
it keeps (item 4)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_local_pipeline  # tests/ is on sys.path

from marn.config import SynthConfig, load_config
from marn.data.files import write_parquet_atomic
from marn.data.synth import synthesize
from marn.features.materialize import materialize_features
from marn.stages import work_path

pytestmark = pytest.mark.slow


def test_the_courier_switch_runs_the_stage_and_the_models_read_its_vectors(tmp_path, tiny_settings):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(users=60, items=50, image_size=16))
    settings = tiny_settings(tmp_path / "work")
    settings.update(
        embed={
            "image_size": 64,
            "method": "courier",
            "courier": {"dim": 16, "hidden": 32, "epochs": 2, "negatives": 16, "min_history": 2},
        },
        pipeline={"tune": False},
        distributed={"workers": 1},
    )
    run = run_local_pipeline(tmp_path, data, settings)
    order = sorted(run.glob("*/executor_output.json"), key=lambda p: p.stat().st_mtime)
    names = [p.parent.name for p in order]
    assert names.index("features") < names.index("courier") < names.index("tune") < names.index("train")
    table = pq.read_table(data / "courier_embeddings.parquet")
    images = pq.read_table(data / "image_embeddings.parquet")
    assert table.num_rows == images.num_rows  # every item with a poster
    metrics = json.loads((data / "courier_metrics.json").read_text())
    assert metrics["settings"]["dim"] == 16 and 1 <= metrics["best_epoch"] <= 2
    assert 0.0 <= metrics["recall_at_k"]["courier"] <= 1.0

    version = json.loads((tmp_path / "work" / "registry" / "marn" / "champion.json").read_text())["version"]
    saved = torch.load(
        tmp_path / "work" / "registry" / "marn" / version / "model.pt", map_location="cpu", weights_only=True
    )
    assert saved["features"]["image_source"] == "courier"
    assert saved["features"]["image"].shape[1] == 16  # COURIER's width, not the backbone's 1280

    # A new item arrives after training with only the embed stage's backbone vector (the poster of an
    # existing item): served, it must land on that item's COURIER row, through the head the model keeps.
    from serve.features import FeatureFetcher
    from serve.scoring import ArmScorer, ScoreRequest

    items = pd.read_parquet(data / "items.parquet")
    twin = sorted(set(table.column("item_id").to_pylist()))[0]
    items = pd.concat([items, items[items["item_id"].astype(str) == twin].assign(item_id="new-poster")])
    write_parquet_atomic(pa.Table.from_pandas(items, preserve_index=False), data / "items.parquet")
    poster = images.filter(pa.compute.equal(images.column("item_id"), twin))
    poster = poster.set_column(0, "item_id", pa.array(["new-poster"], pa.string()))
    write_parquet_atomic(pa.concat_tables([images, poster]), data / "image_embeddings.parquet")
    cfg = load_config(tmp_path / "config.yaml")  # the settings run_local_pipeline wrote
    materialize_features(data, cfg)
    checkpoint = tmp_path / "work" / "registry" / "marn" / version / "model.pt"
    scorer = ArmScorer(checkpoint, FeatureFetcher(work_path(cfg, cfg.feast.repo_dir, "feast")), 8)
    assert scorer.cold_images  # Feast's backbone vectors, through the head, give the trained COURIER rows
    [scores] = scorer.score([ScoreRequest("someone", ["new-poster", twin])], 1_900_000_000 * 10**6)
    assert len(scores) == 2 and all(0.0 < p < 1.0 for p in scores)
    row = scorer.model.embedding.image[scorer._cold["new-poster"]].numpy()
    expected = table.filter(pa.compute.equal(table.column("item_id"), twin)).column("embedding")[0].as_py()
    np.testing.assert_allclose(row, np.asarray(expected, dtype=np.float32), atol=1e-5)
