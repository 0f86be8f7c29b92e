"""Feast's file registry store with whole-file writes.

Feast's ``FileRegistryStore`` (0.67) opens ``registry.db`` with mode ``"wb"`` and writes the new registry into
it: between the truncation and the last byte, a reader in another process (a serving replica refreshing its
cached registry while the register stage applies a new version's view) reads an empty or half-written file.
Protobuf parses a prefix that ends on a field boundary without complaint, so the reader gets a registry with
views missing ("Feature view user_sequences does not exist") and fails a request. Here the new registry is
written to a temporary file beside it, flushed to disk and renamed over it: every reader sees the old
registry or the new one, whole.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.utils import _utc_now

from marn.data.files import write_atomic


class AtomicFileRegistryStore(FileRegistryStore):
    def _write_registry(self, registry_proto: RegistryProto) -> None:
        registry_proto.version_id = str(uuid.uuid4())  # what Feast's own write stamps
        registry_proto.last_updated.FromDatetime(_utc_now())
        self._filepath.parent.mkdir(exist_ok=True)
        write_atomic(self._filepath, lambda tmp: _write_synced(tmp, registry_proto.SerializeToString()))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the registry
