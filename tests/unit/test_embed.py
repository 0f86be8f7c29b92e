"""The embed stage without Ray: content hashes, the vector cache, title vectors, missing-image accounting.

Runs that would need Ray are avoided by filling the cache first; ``ray_session`` is replaced by one that
fails, so a test also fails if the stage starts Ray when it has nothing to compute.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import marn.embed.stage as stage
from marn.config import EmbedConfig, RayConfig
from marn.data.files import content_hash
from marn.data.schema import IMAGE_EMBEDDINGS, TITLE_EMBEDDINGS, write_table
from marn.data.text.word_vectors import WordVectors, title_vectors
from marn.embed.cache import VectorCache, cache_identity, list_column
from marn.embed.images import ImageEmbedder
from marn.embed.stage import embed_items

DIM = 1280  # mobilenet_v2


def png(path: Path, color: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def write_items(data_dir: Path, uris: list[str | None], titles: list[str | None]) -> None:
    n = len(uris)
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "category_id": ["c"] * n,
            "brand_id": ["b"] * n,
            "shop_id": ["s"] * n,
            "title": titles,
            "image_uri": uris,
            "first_seen": pd.Timestamp("2025-01-01", tz="UTC"),
        }
    )
    write_table(data_dir, "items", items)


@pytest.fixture
def no_ray(monkeypatch):
    @contextmanager
    def refuse(_cfg):
        raise AssertionError("the embed stage started Ray although everything was cached")
        yield

    monkeypatch.setattr(stage, "ray_session", refuse)


@pytest.fixture
def glove(tmp_path) -> Path:
    path = tmp_path / "glove.txt"
    path.write_text("red 1 2\nblue 3 4\nwool 5 -6\n")
    return path


def read_vectors(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path).to_pandas()
    return {
        i: np.asarray(v, dtype=np.float32) for i, v in zip(table["item_id"], table["embedding"], strict=True)
    }


# ---------------------------------------------------------------------------------------------------------
# hashing and cache identity
# ---------------------------------------------------------------------------------------------------------


def test_content_hash_is_the_sha256_of_the_bytes_whatever_the_name(tmp_path):
    a = png(tmp_path / "a.png", (200, 10, 10))
    b = tmp_path / "elsewhere" / "b.png"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    assert content_hash(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert content_hash(b) == content_hash(a)
    png(b, (10, 200, 10))
    assert content_hash(b) != content_hash(a)


def test_cache_identity_names_backbone_weights_and_size(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not really weights")
    assert cache_identity("mobilenet_v2", None, 224) == "mobilenet_v2-random-224"
    digest = hashlib.sha256(b"not really weights").hexdigest()[:16]
    assert cache_identity("vgg16", weights, 64) == f"vgg16-{digest}-64"
    assert cache_identity("vgg16", None, 64) != cache_identity("vgg16", None, 224)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        cache_identity("vgg16", tmp_path / "nowhere.pth", 224)


# ---------------------------------------------------------------------------------------------------------
# the vector cache
# ---------------------------------------------------------------------------------------------------------


def test_cache_merges_parts_later_wins_and_keeps_unreadable_as_none(tmp_path):
    cache = VectorCache(tmp_path / "c", dim=3)
    assert cache.load() == {}
    assert cache.add({}) is None
    cache.add({"h1": np.array([1, 2, 3], np.float32), "h2": None})
    cache.add({"h1": np.array([7, 8, 9], np.float32), "h3": np.array([0, 0, 1], np.float32)})
    loaded = cache.load()
    assert sorted(loaded) == ["h1", "h2", "h3"]
    np.testing.assert_array_equal(loaded["h1"], [7, 8, 9])
    assert loaded["h2"] is None
    assert loaded["h3"].dtype == np.float32

    cache.compact()
    assert len(cache.parts()) == 1
    compacted = cache.load()
    assert sorted(compacted) == ["h1", "h2", "h3"]
    np.testing.assert_array_equal(compacted["h1"], [7, 8, 9])
    assert compacted["h2"] is None
    assert not list((tmp_path / "c").glob(".*tmp"))  # no temporary files left behind


def test_cache_refuses_vectors_of_another_size(tmp_path):
    VectorCache(tmp_path / "c", dim=3).add({"h": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="3 values, the backbone gives 4"):
        VectorCache(tmp_path / "c", dim=4).load()


def test_list_column_keeps_nulls_and_rejects_wrong_lengths():
    column = list_column([np.array([1, 2], np.float32), None, np.array([3, 4])], dim=2)
    assert column.type == pa.list_(pa.float32())
    assert column.to_pylist() == [[1.0, 2.0], None, [3.0, 4.0]]
    with pytest.raises(ValueError, match="2 values, got one with 3"):
        list_column([np.ones(3)], dim=2)


# ---------------------------------------------------------------------------------------------------------
# title vectors
# ---------------------------------------------------------------------------------------------------------


def test_title_vectors_average_known_words_and_give_zeros_otherwise():
    words = WordVectors(("red", "blue"), np.array([[1.0, 2.0], [3.0, 6.0]], np.float32))
    out = title_vectors(["Red blue", "red RED blue zebra", "zebra tutu", None, ""], words)
    assert out.shape == (5, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [2.0, 4.0])
    np.testing.assert_allclose(out[1], [(1 + 1 + 3) / 3, (2 + 2 + 6) / 3])  # repeats count, OOV ignored
    np.testing.assert_array_equal(out[2:], 0.0)


# ---------------------------------------------------------------------------------------------------------
# the stage, all vectors from the cache
# ---------------------------------------------------------------------------------------------------------


def test_fully_cached_run_counts_missing_images_and_does_not_start_ray(tmp_path, glove, no_ray, caplog):
    data = tmp_path / "data"
    red = png(data / "images" / "red.png", (220, 0, 0))
    (data / "images" / "twin.png").write_bytes(red.read_bytes())  # same content as red: one vector
    png(data / "images" / "blue.png", (0, 0, 220))
    (data / "images" / "broken.png").write_bytes(b"\x89PNG not an image")
    write_items(
        data,
        [
            "images/red.png",
            "images/twin.png",
            "images/blue.png",
            "images/gone.png",
            None,
            "images/broken.png",
        ],
        ["red wool", "blue", "zebra", None, "red red blue", "wool"],
    )
    cfg = EmbedConfig(image_size=64)
    cache_dir = tmp_path / "cache"
    cache = VectorCache(cache_dir / cache_identity(cfg.backbone, None, cfg.image_size), DIM)
    red_vec, blue_vec = np.full(DIM, 0.5, np.float32), np.arange(DIM, dtype=np.float32)
    cache.add(
        {
            content_hash(red): red_vec,
            content_hash(data / "images" / "blue.png"): blue_vec,
            content_hash(data / "images" / "broken.png"): None,  # known unreadable
        }
    )

    with caplog.at_level(logging.WARNING, logger="marn.embed.stage"):
        summary = embed_items(data, cfg, RayConfig(), cache_dir, word_vectors=str(glove), show_progress=False)

    assert "random projections, not ImageNet features" in caplog.text
    assert (summary.items, summary.with_image, summary.computed, summary.reused) == (6, 4, 0, 2)
    assert summary.missing == 3  # gone.png, no image_uri, broken.png
    assert (summary.dim, summary.backbone, summary.device, summary.images_per_s) == (
        DIM,
        "mobilenet_v2",
        "cpu",
        0,
    )
    assert summary.image_path == data / IMAGE_EMBEDDINGS
    table = pq.read_table(summary.image_path)
    assert table.column_names == ["item_id", "embedding", "content_hash", "backbone"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    images = read_vectors(summary.image_path)
    assert sorted(images) == ["i0", "i1", "i2"]
    np.testing.assert_array_equal(images["i0"], red_vec)
    np.testing.assert_array_equal(images["i1"], red_vec)
    np.testing.assert_array_equal(images["i2"], blue_vec)

    assert summary.title_path == data / TITLE_EMBEDDINGS
    titles = read_vectors(summary.title_path)
    assert sorted(titles) == [f"i{k}" for k in range(6)]
    np.testing.assert_allclose(titles["i0"], [3.0, -2.0])  # mean of red (1, 2) and wool (5, -6)
    np.testing.assert_array_equal(titles["i2"], [0.0, 0.0])  # "zebra": no vector
    np.testing.assert_array_equal(titles["i3"], [0.0, 0.0])  # no title
    np.testing.assert_allclose(titles["i4"], [(1 + 1 + 3) / 3, (2 + 2 + 4) / 3])
    assert not list(data.glob(".*tmp"))


def test_no_readable_image_writes_no_image_file_but_titles(tmp_path, glove, no_ray):
    (tmp_path / "image_embeddings.parquet").write_bytes(b"stale")
    write_items(tmp_path, [None, "images/gone.png"], ["red", "blue"])
    summary = embed_items(
        tmp_path, EmbedConfig(), RayConfig(), tmp_path / "cache", word_vectors=str(glove), show_progress=False
    )
    assert (summary.items, summary.with_image, summary.missing, summary.computed) == (2, 0, 2, 0)
    assert not summary.image_path.exists()
    assert sorted(read_vectors(summary.title_path)) == ["i0", "i1"]


def test_missing_items_table_or_weights_file_is_named(tmp_path, no_ray):
    with pytest.raises(FileNotFoundError, match=r"items\.parquet"):
        embed_items(tmp_path, EmbedConfig(), RayConfig(), tmp_path / "cache", show_progress=False)
    write_items(tmp_path, [None], ["x"])
    cfg = EmbedConfig(weights=tmp_path / "missing-weights.pth")
    with pytest.raises(FileNotFoundError, match=r"missing-weights\.pth"):
        embed_items(tmp_path, cfg, RayConfig(), tmp_path / "cache", show_progress=False)


# ---------------------------------------------------------------------------------------------------------
# the Ray Data worker, called directly
# ---------------------------------------------------------------------------------------------------------


def test_image_embedder_is_seeded_and_tells_undecodable_from_vanished_files(tmp_path):
    import torch

    good = png(tmp_path / "good.png", (30, 120, 200), size=40)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    paths = [str(good), str(bad), str(tmp_path / "vanished.png")]
    batch = {"content_hash": np.array(["g", "b", "v"]), "path": np.array(paths)}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    first = ImageEmbedder("mobilenet_v2", None, image_size=32)(batch)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random state is left alone
    second = ImageEmbedder("mobilenet_v2", None, image_size=32)(batch)
    assert first["embedding"].shape == (3, DIM)
    assert first["embedding"].dtype == np.float32
    assert first["ok"].tolist() == [True, False, False]
    assert first["undecodable"].tolist() == [False, True, False]
    assert list(first["content_hash"]) == ["g", "b", "v"]
    assert np.isfinite(first["embedding"][0]).all() and first["embedding"][0].std() > 0
    np.testing.assert_array_equal(first["embedding"][1:], 0.0)
    np.testing.assert_array_equal(first["embedding"], second["embedding"])  # the same seeded network
    assert (first["ended"] >= first["started"]).all()
