"""The embed stage: ``embed_items`` writes a dataset's image and title vectors (see :mod:`marn.embed`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from marn.config import EmbedConfig, RayConfig
from marn.data.files import content_hash, write_parquet_atomic
from marn.data.schema import IMAGE_EMBEDDINGS, ITEMS, TITLE_EMBEDDINGS, read_table, resolve_image_uri
from marn.data.text.word_vectors import load_word_vectors, title_vectors
from marn.embed.cache import VectorCache, cache_identity, list_column
from marn.embed.images import embed_with_ray
from marn.ray_runtime import ray_session

log = logging.getLogger(__name__)

# progress(phase, done, total): "hash images" counts items (read and hashed here), "embed images" distinct
# images embedded by the actor pool, tallied by the driver as each batch comes back.
ProgressHook = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EmbedSummary:
    """What one run of the embed stage did. Image counts are per item unless they say "distinct"."""

    items: int  # items in items.parquet
    with_image: int  # items whose image file exists
    computed: int  # distinct image contents embedded by this run
    reused: int  # distinct image contents whose vector came from the cache
    missing: int  # items without an image vector: no image_uri, no file, or an unreadable file
    seconds: float  # the whole stage, wall clock
    images_per_s: float  # the actor pool's rate, first batch to last (start-up excluded); 0 if none computed
    backbone: str
    device: str  # where this run's vectors were computed: "cpu" or "cuda" ("cpu" when none were)
    dim: int  # image vector size (the backbone's out_dim)
    image_path: Path
    title_path: Path


def embed_items(
    data_dir: str | Path,
    cfg: EmbedConfig,
    ray_cfg: RayConfig,
    cache_dir: Path,
    word_vectors: str | None = None,
    show_progress: bool = True,
    progress: ProgressHook | None = None,
) -> EmbedSummary:
    """Write ``image_embeddings.parquet`` and ``title_embeddings.parquet`` into ``data_dir``.

    ``word_vectors``: a GloVe file or folder for :func:`marn.data.text.load_word_vectors`; None: the default
    GloVe 6B 50-d package. ``show_progress``: Ray Data's own bars. ``progress``: see :data:`ProgressHook`.
    Raises FileNotFoundError for a missing items table or weights file.
    """
    from marn.encoders import BACKBONES  # torch: only when the stage runs

    started = time.perf_counter()
    data_dir = Path(data_dir)
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"embed.backbone {cfg.backbone!r} is unknown; choose one of {sorted(BACKBONES)}")
    dim = BACKBONES[cfg.backbone].out_dim
    items = read_table(data_dir, ITEMS)  # FileNotFoundError, naming the path, when absent
    if items is None or "item_id" not in items.columns:
        raise ValueError(f"{data_dir}: items.parquet has no item_id column")
    items = items.drop_duplicates("item_id").reset_index(drop=True)
    item_ids = items["item_id"].astype(str).tolist()

    identity = cache_identity(cfg.backbone, cfg.weights, cfg.image_size)
    if cfg.weights is None:
        log.warning(
            "embed: %s has no weights file (embed.weights), so its seeded random initialisation is used: the "
            "image vectors are random projections, not ImageNet features",
            cfg.backbone,
        )
    paths = _image_paths(data_dir, items)
    hashes = _hash_images(paths, progress)  # item row -> content hash, None without a readable file
    cache = VectorCache(Path(cache_dir) / identity, dim)
    cached = cache.load()
    wanted = {h for h in hashes if h is not None}
    todo_hashes = sorted(wanted - cached.keys())
    first_path = {h: p for h, p in zip(hashes, paths, strict=True) if h is not None}  # duplicates: one file

    device, images_per_s, computed = "cpu", 0.0, {}
    if todo_hashes:
        todo = pd.DataFrame({"content_hash": todo_hashes, "path": [str(first_path[h]) for h in todo_hashes]})
        log.info(
            "embed: %d distinct images to embed with %s (%d in cache)",
            len(todo),
            identity,
            len(wanted) - len(todo),
        )
        with ray_session(ray_cfg):
            computed, device, images_per_s = embed_with_ray(todo, cfg, cache, show_progress, progress)
        cache.compact()
    vectors = {**cached, **computed}

    rows = [(item, h, vectors.get(h)) for item, h in zip(item_ids, hashes, strict=True) if h is not None]
    rows = [(item, h, v) for item, h, v in rows if v is not None]
    image_table = pa.table(
        {
            "item_id": pa.array([r[0] for r in rows], pa.string()),
            "embedding": list_column([r[2] for r in rows], dim),
            "content_hash": pa.array([r[1] for r in rows], pa.string()),
            "backbone": pa.array([identity] * len(rows), pa.string()),
        }
    )
    image_path = data_dir / IMAGE_EMBEDDINGS
    if rows:
        write_parquet_atomic(image_table, image_path)
    else:  # an empty file would fail item_features; without one it falls back to pixels (zeros here)
        image_path.unlink(missing_ok=True)
        log.warning("embed: no item has a readable image; %s not written", image_path)

    titles = items["title"] if "title" in items.columns else pd.Series([None] * len(items))
    words = load_word_vectors(word_vectors)
    title_table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.string()),
            "embedding": list_column(title_vectors(titles.tolist(), words), words.dim),
        }
    )
    title_path = write_parquet_atomic(title_table, data_dir / TITLE_EMBEDDINGS)

    n_computed = sum(v is not None for v in computed.values())
    missing = len(items) - len(rows)
    if missing:
        log.warning(
            "embed: %d of %d items have no readable image and get no image vector", missing, len(items)
        )
    summary = EmbedSummary(
        items=len(items),
        with_image=sum(h is not None for h in hashes),
        computed=n_computed,
        reused=sum(cached[h] is not None for h in wanted & cached.keys()),
        missing=missing,
        seconds=time.perf_counter() - started,
        images_per_s=images_per_s,
        backbone=cfg.backbone,
        device=device,
        dim=dim,
        image_path=image_path,
        title_path=title_path,
    )
    log.info(
        "embed: %d items, %d images embedded (%.1f images/s on %s), %d reused from cache, %d missing, %.1f s",
        summary.items,
        summary.computed,
        summary.images_per_s,
        summary.device,
        summary.reused,
        summary.missing,
        summary.seconds,
    )
    return summary


def _image_paths(data_dir: Path, items: pd.DataFrame) -> list[Path | None]:
    uris = items["image_uri"] if "image_uri" in items.columns else pd.Series([None] * len(items))
    return [resolve_image_uri(data_dir, uri) for uri in uris.tolist()]


def _hash_images(paths: list[Path | None], progress: ProgressHook | None = None) -> list[str | None]:
    """Content hash per item row; None when the item has no image_uri or its file cannot be read."""
    hashes: list[str | None] = []
    if progress is not None:
        progress("hash images", 0, len(paths))
    for path in paths:
        hashes.append(_hash_or_none(path))
        if progress is not None:
            progress("hash images", len(hashes), len(paths))
    return hashes


def _hash_or_none(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    try:
        return content_hash(path)
    except OSError as err:
        log.warning("embed: cannot read %s: %s", path, err)
        return None
