"""The embed stage's Ray Data worker: an actor pool, one backbone per actor, image batches in, vectors out."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from marn.config import EmbedConfig
from marn.embed.cache import VectorCache

if TYPE_CHECKING:
    from marn.embed.stage import ProgressHook

log = logging.getLogger(__name__)

RESIZE_RATIO = 256 / 224  # torchvision's evaluation transform: shorter side to 256, centre crop 224
_FLUSH_ROWS = 1024  # computed vectors written to a cache part at a time: what an interruption can lose


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


def embed_with_ray(
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
