"""Item modalities as model inputs (paper 3.1): one row per item code, row 0 (PAD / unknown) all empty.

- image: a pre-extracted vector per item. ``DATA/image_embeddings.parquet`` (item_id, embedding) when the
  embed stage wrote one (VGG16 fc7, 4096-d, in the paper; any dimension works); otherwise the raw pixels
  of a small thumbnail, which is cheap and keeps colour and coarse shape. With ``embed.method: courier``,
  ``DATA/courier_embeddings.parquet`` instead (same columns; :mod:`marn.embed.courier`), and it must exist
  with the head that wrote it (``image_head``: serving maps a new item's backbone vector through it).
- title: token codes of the first ``title_len`` words, plus the frozen word vectors they index.
- stats: not a per-item table. Statistics change over time, so every sample carries its items' values as
  of its own time (:mod:`marn.data.stats`, :func:`marn.data.samples.build_samples`); what belongs to the
  model is the :class:`~marn.data.stats.StatDiscretizer` fitted on the training split, kept here so it
  is saved and loaded with the rest of the item inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image

from marn.config import EmbedConfig, FeaturesConfig
from marn.data.schema import COURIER_EMBEDDINGS, IMAGE_EMBEDDINGS, Dataset, resolve_image_uri
from marn.data.stats import StatDiscretizer
from marn.data.tensors import ItemCatalog
from marn.data.text.vocab import build_title_vocabulary, encode_titles
from marn.data.text.word_vectors import load_word_vectors
from marn.embed.courier import read_courier_head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemFeatures:
    """Per-item model inputs, indexed by item code (``ItemCatalog.items``)."""

    image: np.ndarray  # (n_items + 1, D_img) float32
    title: np.ndarray  # (n_items + 1, H) int64 title-vocabulary codes
    word_vectors: np.ndarray  # (V, D_word) float32, frozen; row 0 = PAD zeros
    statistics: StatDiscretizer  # the F statistics and their bucket boundaries (training split)
    image_source: str  # "embeddings", "courier" or "pixels:<side>"
    # courier: the head that maps a backbone vector to an image row (CourierHead.to_state); else None
    image_head: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.title.shape[0] != self.image.shape[0]:
            raise ValueError(f"item feature tables disagree on the item count: {self.shapes}")

    @property
    def n_items(self) -> int:
        return self.image.shape[0]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        names = ("image", "title", "word_vectors")
        return {name: tuple(getattr(self, name).shape) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {
            "image": torch.from_numpy(self.image),
            "title": torch.from_numpy(self.title),
            "word_vectors": torch.from_numpy(self.word_vectors),
            "statistics": self.statistics.to_dict(),
            "image_source": self.image_source,
        } | ({} if self.image_head is None else {"image_head": self.image_head})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemFeatures:
        return cls(
            image=data["image"].numpy(),
            title=data["title"].numpy(),
            word_vectors=data["word_vectors"].numpy(),
            statistics=StatDiscretizer.from_dict(data["statistics"]),
            image_source=str(data["image_source"]),
            image_head=data.get("image_head"),
        )


def image_table(cfg: EmbedConfig) -> str:
    """The vector table the models read for ``embed.method``: the backbone's or COURIER's."""
    return COURIER_EMBEDDINGS if cfg.method == "courier" else IMAGE_EMBEDDINGS


def build_item_features(
    dataset: Dataset,
    catalog: ItemCatalog,
    cfg: FeaturesConfig,
    statistics: StatDiscretizer,
    vectors: str = IMAGE_EMBEDDINGS,
) -> ItemFeatures:
    """Image and title inputs per item code; ``statistics`` from
    :func:`marn.data.tensors.fit_statistics` on the training samples; ``vectors``: the image table,
    :func:`image_table` of the run's embed section."""
    items = dataset.items.drop_duplicates("item_id").reset_index(drop=True)
    codes = catalog.items.encode(items["item_id"].astype(str).tolist())  # (n,) row of each item
    n_rows = len(catalog.items)
    image, image_source = _image_matrix(dataset, items, codes, n_rows, cfg, vectors)
    title, word_vectors = _title_codes(items, codes, n_rows, cfg)
    head = None
    if image_source == "courier":
        head = read_courier_head(dataset.root)
    return ItemFeatures(image, title, word_vectors, statistics, image_source, head)


def _title_codes(
    items: pd.DataFrame, codes: np.ndarray, n_rows: int, cfg: FeaturesConfig
) -> tuple[np.ndarray, np.ndarray]:
    titles = items.get("title", pd.Series("", index=items.index)).fillna("").astype(str).tolist()
    vectors = load_word_vectors(cfg.word_vectors)
    vocab = build_title_vocabulary(titles, vectors, min_count=cfg.title_min_count)
    title = np.zeros((n_rows, cfg.title_len), dtype=np.int64)
    title[codes] = encode_titles(titles, vocab, cfg.title_len)
    log.info("titles: %d words, %.0f%% of tokens have a pre-trained vector", len(vocab), 100 * vocab.coverage)
    return title, vocab.embeddings


def _image_matrix(
    dataset: Dataset,
    items: pd.DataFrame,
    codes: np.ndarray,
    n_rows: int,
    cfg: FeaturesConfig,
    vectors: str = IMAGE_EMBEDDINGS,
) -> tuple[np.ndarray, str]:
    path = dataset.root / vectors if dataset.root is not None else None
    courier = vectors == COURIER_EMBEDDINGS
    if courier and cfg.image == "pixels":
        raise ValueError("embed.method is 'courier' but features.image is 'pixels': choose one")
    if courier or cfg.image == "embeddings" or (cfg.image == "auto" and path is not None and path.exists()):
        if path is None or not path.exists():
            stage = "the courier stage (marn courier)" if courier else "the embed stage"
            raise FileNotFoundError(
                f"the image vectors {path or vectors} do not exist; run {stage} first"
                + ("" if courier else " or set features.image to 'pixels'")
            )
        return _read_embeddings(path, items, codes, n_rows), "courier" if courier else "embeddings"
    side = cfg.image_pixels
    image = np.zeros((n_rows, 3 * side * side), dtype=np.float32)
    missing = 0
    uris = items.get("image_uri", pd.Series(None, index=items.index, dtype=object))
    for code, uri in zip(codes, uris, strict=True):
        file = resolve_image_uri(dataset.root or ".", uri)
        if file is None or not file.exists():
            missing += 1
            continue
        with Image.open(file) as img:
            thumb = img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
        image[code] = np.asarray(thumb, dtype=np.float32).reshape(-1) / 255.0 - 0.5
    if missing:
        log.warning("images: %d of %d items have no readable image; vector zeros", missing, len(codes))
    return image, f"pixels:{side}"


def _read_embeddings(path: Path, items: pd.DataFrame, codes: np.ndarray, n_rows: int) -> np.ndarray:
    table = pq.read_table(path, columns=["item_id", "embedding"]).to_pandas()
    if table.empty:
        raise ValueError(f"{path}: no rows")
    vectors = np.stack(table["embedding"].to_numpy()).astype(np.float32)  # (n_emb, D)
    by_item = pd.Series(np.arange(len(table)), index=table["item_id"].astype(str))
    row = by_item.reindex(items["item_id"].astype(str)).to_numpy()
    image = np.zeros((n_rows, vectors.shape[1]), dtype=np.float32)
    found = ~np.isnan(row)
    image[codes[found]] = vectors[row[found].astype(np.int64)]
    if not found.all():
        log.warning("%s: %d of %d items have no embedding; vector zeros", path, (~found).sum(), len(row))
    return image
