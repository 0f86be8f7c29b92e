"""Opening input files the way public datasets ship them: plain or gzipped, whatever the name says."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import IO

_GZIP_MAGIC = b"\x1f\x8b"


def open_binary(path: Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, gunzipping it when its content (not its name) says gzip."""
    with path.open("rb") as probe:
        gzipped = probe.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else path.open("rb")
