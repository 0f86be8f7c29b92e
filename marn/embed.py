"""The embed stage: one image vector per item (paper 3.1.1, an ImageNet CNN's features) and one title vector.

    summary = embed_items(data_dir, cfg.embed, cfg.ray, cache_dir=work_dir / "embed-cache")

writes into the dataset directory

- ``image_embeddings.parquet``: item_id, embedding (list<float32>, the backbone's ``out_dim``), content_hash,
  backbone (the cache identity: ``<backbone>-<weights sha256[:16] or "random">-<image size>``). Items
  without a readable image get no row; :mod:`marn.data.item_features` fills zeros for them. When no item
  has one, the file is not written (and a stale one is removed).
- ``title_embeddings.parquet``: item_id, embedding (list<float32>): the mean of the title's pre-trained word
  vectors, zeros when none of its words has one.

Images are keyed by the sha256 of their file bytes, and vectors are cached per (backbone, weights, image size)
under ``cache_dir``. A rerun embeds only image contents the cache lacks, identical images shared by many
items are embedded once, and when nothing is left to embed Ray is never started. The work itself is a Ray
Data ``map_batches`` over an actor pool (one model per actor, on a GPU when the cluster has them).

Every file is written under a temporary name and then renamed, and computed vectors reach the cache in parts
while the run goes on, so an interrupted run keeps what it finished and leaves no half-written file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from marn.config import EmbedConfig, RayConfig
from marn.data.schema import ITEMS, read_table, resolve_image_uri
from marn.data.text.tokenize import tokenize
from marn.data.text.word_vectors import WordVectors, load_word_vectors
from marn.ray_runtime import ray_session

log = logging.getLogger(__name__)

IMAGE_EMBEDDINGS = "image_embeddings.parquet"  # the name marn.data.item_features reads
TITLE_EMBEDDINGS = "title_embeddings.parquet"
RESIZE_RATIO = 256 / 224  # torchvision's evaluation transform: shorter side to 256, centre crop 224
_FLUSH_ROWS = 1024  # computed vectors written to a cache part at a time: what an interruption can lose
_HASH_CHUNK = 1 << 20

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


# ---------------------------------------------------------------------------------------------------------
# Content hashes and the vector cache
# ---------------------------------------------------------------------------------------------------------


def content_hash(path: Path | str) -> str:
    """sha256 hex digest of a file's bytes: the cache key of an image, whatever its name or location."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_identity(backbone: str, weights: Path | None, image_size: int) -> str:
    """``<backbone>-<weights sha256[:16] or "random">-<image size>``: everything a vector depends on.

    The image size belongs in the key because the same network sees a different crop at another size.
    """
    if weights is None:
        weights_id = "random"
    else:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"embed.weights: weights file not found: {weights}")
        weights_id = content_hash(weights)[:16]
    return f"{backbone}-{weights_id}-{image_size}"


class VectorCache:
    """content_hash -> vector, stored as parquet parts in one folder per :func:`cache_identity`.

    A hash whose image could not be decoded is stored with a null vector, so a rerun neither retries the
    same bytes nor starts Ray for them. Parts are only ever added whole (temporary name, then rename);
    :meth:`compact` folds them into one.
    """

    def __init__(self, root: Path, dim: int):
        self.root = Path(root)
        self.dim = dim

    def parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet")) if self.root.is_dir() else []

    def load(self) -> dict[str, np.ndarray | None]:
        """Every cached hash; a later part wins over an earlier one for the same hash."""
        vectors: dict[str, np.ndarray | None] = {}
        for part in self.parts():
            table = pq.read_table(part, columns=["content_hash", "embedding"])
            hashes = table.column("content_hash").to_pylist()
            for key, vector in zip(hashes, _vectors_or_none(table.column("embedding"), part), strict=True):
                if vector is not None and vector.shape != (self.dim,):
                    raise ValueError(
                        f"{part}: a cached vector has {vector.shape[0]} values, the backbone gives "
                        f"{self.dim}; delete that cache folder"
                    )
                vectors[key] = vector
        return vectors

    def add(self, vectors: dict[str, np.ndarray | None]) -> Path | None:
        """Write ``vectors`` as a new part; None when there is nothing to write."""
        if not vectors:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.root / name
        write_parquet_atomic(_cache_table(vectors, self.dim), path)
        return path

    def compact(self) -> None:
        """Fold the parts present now into one; parts another process adds meanwhile are kept."""
        parts = self.parts()
        if len(parts) < 2:
            return
        merged = self.load()
        self.add(merged)  # named after every current part, so it wins on load until they are gone
        for part in parts:
            part.unlink(missing_ok=True)


def _cache_table(vectors: dict[str, np.ndarray | None], dim: int) -> pa.Table:
    hashes = list(vectors)
    rows = [vectors[h] for h in hashes]
    return pa.table({"content_hash": pa.array(hashes, pa.string()), "embedding": list_column(rows, dim)})


def _vectors_or_none(column: pa.ChunkedArray, source: Path) -> Iterator[np.ndarray | None]:
    for chunk in column.chunks:
        if not pa.types.is_list(chunk.type) and not pa.types.is_large_list(chunk.type):
            raise ValueError(f"{source}: embedding must be a list<float> column, got {chunk.type}")
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            yield values[offsets[i] : offsets[i + 1]].copy() if valid[i] else None


def list_column(rows: Iterable[np.ndarray | None], dim: int) -> pa.ListArray:
    """Vectors of length ``dim`` (None: a null entry) -> a list<float32> arrow array, no Python floats."""
    rows = list(rows)
    present = np.array([r is not None for r in rows], dtype=bool)
    lengths = np.where(present, dim, 0)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    kept = [np.asarray(r, dtype=np.float32).reshape(-1) for r in rows if r is not None]
    bad = [v.shape[0] for v in kept if v.shape[0] != dim]
    if bad:
        raise ValueError(f"every vector must have {dim} values, got one with {bad[0]}")
    flat = np.concatenate(kept) if kept else np.zeros(0, dtype=np.float32)
    mask = pa.array(~present) if not present.all() else None
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.float32()), mask=mask)


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Write to a temporary name beside ``path``, then rename: readers see the old file or the new, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Title vectors
# ---------------------------------------------------------------------------------------------------------


def title_vectors(titles: Iterable[object], word_vectors: WordVectors) -> np.ndarray:
    """(N, D) float32: per title the mean vector of its tokens that have one (repeats count), else zeros."""
    index, matrix = word_vectors.index, word_vectors.matrix
    titles = list(titles)
    out = np.zeros((len(titles), word_vectors.dim), dtype=np.float32)
    for i, title in enumerate(titles):
        rows = [row for row in (index.get(w) for w in tokenize(title)) if row is not None]
        if rows:
            out[i] = matrix[rows].mean(axis=0, dtype=np.float64)
    return out


# ---------------------------------------------------------------------------------------------------------
# The Ray Data worker
# ---------------------------------------------------------------------------------------------------------


class ImageEmbedder:
    """Ray Data callable class: one backbone per actor, batches of (content_hash, path) -> vectors.

    Output columns: content_hash, embedding (B, D) float32, ok (False: no vector, the row is zeros),
    undecodable (the bytes are not an image: worth remembering, unlike a file that vanished since it was
    hashed), and for throughput accounting the actor's pid and the batch's start and end (epoch seconds).
    Plain Python too, so it is testable without Ray; ``threads`` None leaves torch's thread count alone.
    """

    def __init__(
        self,
        backbone: str,
        weights: str | None,
        image_size: int,
        device: str = "cpu",
        threads: int | None = None,
    ):
        import torch

        from marn.encoders import build_backbone

        if threads is not None:
            torch.set_num_threads(max(1, threads))
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
            torch.manual_seed(0)  # with no weights file: the same random network in every actor and run
            self.model = build_backbone(backbone, weights).to(device)
        self.device = device
        self.image_size = image_size
        self.resize = round(image_size * RESIZE_RATIO)
        self.dim = self.model.out_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from marn.encoders import ImageLoadError, load_image, preprocess

        started = time.time()  # wall clock: comparable across actors, unlike perf_counter
        paths = batch["path"]
        ok = np.ones(len(paths), dtype=bool)
        undecodable = np.zeros(len(paths), dtype=bool)
        images = []
        for i, path in enumerate(paths):
            try:
                images.append(preprocess(load_image(str(path)), self.image_size, self.resize))
            except ImageLoadError as err:
                log.warning("embed: %s", err)
                ok[i], undecodable[i] = False, True
            except OSError as err:  # vanished or unreadable since it was hashed: try again next run
                log.warning("embed: %s", err)
                ok[i] = False
        vectors = np.zeros((len(paths), self.dim), dtype=np.float32)
        if images:
            with torch.inference_mode():
                x = torch.stack(images).to(self.device, memory_format=torch.channels_last)  # (B, 3, S, S)
                vectors[ok] = self.model(x).float().cpu().numpy()  # (B, D)
        return {
            "content_hash": np.asarray(batch["content_hash"]),
            "embedding": vectors,
            "ok": ok,
            "undecodable": undecodable,
            "pid": np.full(len(paths), os.getpid(), dtype=np.int64),
            "started": np.full(len(paths), started, dtype=np.float64),
            "ended": np.full(len(paths), time.time(), dtype=np.float64),
        }


def _embed_with_ray(
    todo: pd.DataFrame,
    cfg: EmbedConfig,
    cache: VectorCache,
    show_progress: bool,
    progress: ProgressHook | None = None,
) -> tuple[dict[str, np.ndarray | None], str, float]:
    """Embed ``todo`` (content_hash, path) on an actor pool; results also go to ``cache``, part by part.

    Vectors, and None for undecodable images, are cached; a file that could not be read is not.

    Returns (hash -> vector or None, device, the pool's images/s at work).
    """
    import ray
    import ray.data

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and cfg.gpus_per_actor > 0
    device = "cuda" if use_gpu else "cpu"
    context = ray.data.DataContext.get_current()
    progress_bars = context.enable_progress_bars
    context.enable_progress_bars = show_progress
    try:
        return _run_pool(todo, cfg, cache, device, use_gpu, progress)
    finally:
        context.enable_progress_bars = progress_bars


def _run_pool(
    todo: pd.DataFrame,
    cfg: EmbedConfig,
    cache: VectorCache,
    device: str,
    use_gpu: bool,
    progress: ProgressHook | None = None,
) -> tuple[dict[str, np.ndarray | None], str, float]:
    import ray.data

    # One block per batch: a single block would go to a single actor, and results could not stream back.
    # from_items builds blocks in this process; from_pandas starts a metadata task per block.
    records = todo[["content_hash", "path"]].to_dict("records")
    n_blocks = -(-len(records) // cfg.batch_size)
    dataset = ray.data.from_items(records, override_num_blocks=n_blocks).map_batches(
        ImageEmbedder,
        fn_constructor_kwargs={
            "backbone": cfg.backbone,
            "weights": None if cfg.weights is None else str(Path(cfg.weights).expanduser()),
            "image_size": cfg.image_size,
            "device": device,
            "threads": max(1, int(cfg.cpus_per_actor)),
        },
        # `concurrency=` is deprecated in Ray 2.60. A batch is seconds of work: queueing more than one per
        # actor would leave the actors that start later idle.
        compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_tasks_in_flight_per_actor=1),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor if use_gpu else None,
    )
    results: dict[str, np.ndarray | None] = {}
    pending: dict[str, np.ndarray | None] = {}
    done: dict[int, int] = {}  # actor pid -> images embedded
    first_start, last_end = np.inf, -np.inf
    if progress is not None:
        progress("embed images", 0, len(records))  # the clock starts with the pool: its start-up counts
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for key, vector, ok, undecodable in zip(
            batch["content_hash"], batch["embedding"], batch["ok"], batch["undecodable"], strict=True
        ):
            if ok:
                pending[str(key)] = np.asarray(vector, dtype=np.float32)
            elif undecodable:
                pending[str(key)] = None
        for pid in batch["pid"].tolist():
            done[pid] = done.get(pid, 0) + 1
        if progress is not None:
            progress("embed images", sum(done.values()), len(records))
        first_start = min(first_start, float(batch["started"].min()))
        last_end = max(last_end, float(batch["ended"].max()))
        if len(pending) >= _FLUSH_ROWS:
            cache.add(pending)
            results.update(pending)
            pending = {}
    cache.add(pending)
    results.update(pending)
    # From the first batch's start to the last one's end: start-up (Ray, the actors' imports and model
    # builds) is left out, as it does not grow with the catalogue; an actor idling meanwhile is not.
    span = last_end - first_start
    rate = sum(done.values()) / span if span > 0 else 0.0
    log.info("embed: images per actor %s, %.1f images/s together", sorted(done.values()), rate)
    return results, device, rate


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


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
            computed, device, images_per_s = _embed_with_ray(todo, cfg, cache, show_progress, progress)
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
