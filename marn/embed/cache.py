"""The embed stage's vector cache: content hash -> vector, one folder per (backbone, weights, image size)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from marn.data.files import content_hash, write_parquet_atomic


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
