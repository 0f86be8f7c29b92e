"""The embed stage on a real local Ray: Ray Data actor pool, content-hash cache, reruns, item features.

One Ray serves the whole module (started once: it costs seconds on 2 cores); each run still starts its own
actor pool. MobileNetV2 runs with seeded random weights on a tiny synthetic catalogue, and with the real
ImageNet weights on a few MovieLens posters when the shared folder has them.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import marn.embed.stage as stage
from marn.config import EmbedConfig, FeaturesConfig, RayConfig, SynthConfig
from marn.data.item_features import build_item_features
from marn.data.schema import read_dataset, write_table
from marn.data.stats import StatDiscretizer
from marn.data.synth import synthesize
from marn.data.tensors import ItemCatalog
from marn.embed.stage import embed_items
from marn.ray_runtime import ray_session

pytestmark = pytest.mark.slow

DIM = 1280  # MobileNetV2's pooled features
MOBILENET_FILE = "models/mobilenet_v2-b0353104.pth"
POSTERS = "datasets/movielens-100k-media/posters"


@pytest.fixture(scope="module")
def ray_running():
    with ray_session(RayConfig()):
        yield


def vectors_by_item(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path).to_pandas()
    return {
        i: np.asarray(v, dtype=np.float32) for i, v in zip(table["item_id"], table["embedding"], strict=True)
    }


def test_embed_caches_by_content_and_feeds_item_features(tmp_path, ray_running, monkeypatch):
    data = tmp_path / "data"
    synthesize(data, SynthConfig(users=30, items=40, image_size=32))
    glove = tmp_path / "glove.txt"
    glove.write_text("red 0.1 0.2 0.3\nblue -0.1 0.0 0.2\nwool 0.3 -0.2 0.0\n")
    items = read_dataset(data).items
    uris = items["image_uri"].tolist()
    shutil.copyfile(data / uris[0], data / uris[1])  # two items, one image content: embedded once
    cfg = EmbedConfig(backbone="mobilenet_v2", weights=None, image_size=64, batch_size=16, actors=1)
    cache_dir = tmp_path / "cache"

    def run(progress=None):
        return embed_items(
            data, cfg, RayConfig(), cache_dir, word_vectors=str(glove), show_progress=False, progress=progress
        )

    calls = []
    first = run(lambda phase, done, total: calls.append((phase, done, total)))
    # Progress as the driver tallies the actor pool's batches as they come back (39 distinct images; Ray
    # bundles its 13-row blocks into batches of at least 16): a rising count, more than one step
    embedded = [done for phase, done, total in calls if phase == "embed images" and total == 39]
    assert len(embedded) >= 3 and embedded == sorted(set(embedded)) and (embedded[0], embedded[-1]) == (0, 39)
    assert calls[: len(items) + 1] == [("hash images", k, 40) for k in range(41)]
    assert (first.items, first.with_image, first.missing) == (40, 40, 0)
    assert (first.computed, first.reused, first.dim, first.device) == (39, 0, DIM, "cpu")
    assert first.images_per_s > 0
    vectors = vectors_by_item(first.image_path)
    assert sorted(vectors) == sorted(items["item_id"])
    assert all(v.shape == (DIM,) and np.isfinite(v).all() for v in vectors.values())
    ids = items["item_id"].tolist()
    np.testing.assert_array_equal(vectors[ids[0]], vectors[ids[1]])
    assert not np.array_equal(vectors[ids[0]], vectors[ids[2]])

    @contextmanager
    def refuse(_cfg):
        raise AssertionError("a rerun with everything cached started Ray")
        yield

    with monkeypatch.context() as patch:
        patch.setattr(stage, "ray_session", refuse)
        second = run()
    assert (second.computed, second.reused, second.missing) == (0, 39, 0)
    again = vectors_by_item(second.image_path)
    assert all(np.array_equal(again[i], vectors[i]) for i in ids)

    Image.new("RGB", (32, 32), (255, 0, 255)).save(data / uris[5])  # one new image content
    third = run()
    assert (third.computed, third.reused) == (1, 38)  # uris[1] shares uris[0]'s content
    changed = vectors_by_item(third.image_path)
    assert not np.array_equal(changed[ids[5]], vectors[ids[5]])
    assert all(np.array_equal(changed[i], vectors[i]) for i in ids if i != ids[5])

    dataset = read_dataset(data)
    catalog = ItemCatalog.from_items(dataset.items)
    features_cfg = FeaturesConfig(image="embeddings", word_vectors=str(glove), title_len=8)
    no_statistics = StatDiscretizer((), (10, 100), ())  # this test is about the image vectors
    features = build_item_features(dataset, catalog, features_cfg, no_statistics)
    assert features.image_source == "embeddings"
    assert features.image.shape == (len(catalog.items), DIM)
    codes = catalog.items.encode([ids[5]])
    np.testing.assert_array_equal(features.image[codes[0]], changed[ids[5]])

    titles = vectors_by_item(third.title_path)
    assert sorted(titles) == sorted(ids) and all(v.shape == (3,) for v in titles.values())


def test_real_mobilenet_weights_on_movielens_posters(tmp_path, ray_running, shared_dir):
    weights = shared_dir / MOBILENET_FILE
    posters = sorted((shared_dir / POSTERS).glob("*.jpg"))[:4]
    if not weights.is_file() or len(posters) < 4:
        pytest.skip(f"needs {weights} and 4 posters in {shared_dir / POSTERS}")
    n = len(posters)
    items = pd.DataFrame(
        {
            "item_id": [p.stem for p in posters],
            "category_id": ["movie"] * n,
            "brand_id": [None] * n,
            "shop_id": [None] * n,
            "title": ["Toy Story"] * n,
            "image_uri": [str(p) for p in posters],  # absolute: the shared media is not copied
            "first_seen": pd.Timestamp("1995-01-01", tz="UTC"),
        }
    )
    write_table(tmp_path / "data", "items", items)
    glove = tmp_path / "glove.txt"
    glove.write_text("toy 1 0\nstory 0 1\n")
    cfg = EmbedConfig(backbone="mobilenet_v2", weights=weights, image_size=224, batch_size=4)
    summary = embed_items(
        tmp_path / "data", cfg, RayConfig(), tmp_path / "cache", word_vectors=str(glove), show_progress=False
    )
    assert (summary.computed, summary.missing, summary.dim) == (n, 0, DIM)
    matrix = np.stack(list(vectors_by_item(summary.image_path).values()))  # (n, 1280)
    assert matrix.shape == (n, DIM)
    assert np.isfinite(matrix).all()
    assert (matrix >= 0).all()  # pooled after ReLU6
    assert matrix.std(axis=1).min() > 0  # no constant vector
    assert np.abs(matrix[0] - matrix[1]).max() > 1e-3  # different posters, different vectors
    np.testing.assert_allclose(vectors_by_item(summary.title_path)[posters[0].stem], [0.5, 0.5])
