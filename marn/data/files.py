"""Files in and out: inputs opened the way public datasets ship them (plain or gzipped, whatever the name
says), outputs written whole or not at all, and file contents hashed."""

from __future__ import annotations

import gzip
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

_GZIP_MAGIC = b"\x1f\x8b"
_HASH_CHUNK = 1 << 20


def open_binary(path: Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, gunzipping it when its content (not its name) says gzip."""
    with path.open("rb") as probe:
        gzipped = probe.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def content_hash(path: Path | str) -> str:
    """sha256 hex digest of a file's bytes: its identity, whatever its name or location."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path | str, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it over ``path``: readers see the old
    file or the new one, whole, even when the writer is stopped half way; no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # unique: concurrent writers
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_parquet_atomic(table: pa.Table, path: Path | str) -> Path:
    import pyarrow.parquet as pq

    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))
