"""The Feast registry file is replaced whole: a reader racing a writer never parses a partial registry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from feast.infra.registry.file import FileRegistryStore
from feast.infra.registry.registry import get_registry_store_class_from_type
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.repo_config import RegistryConfig

from marn.features.registry_store import AtomicFileRegistryStore
from marn.features.repo import ATOMIC_FILE_REGISTRY_STORE

VIEWS = 400  # a registry of some size: each write takes a few syscalls' time
MAX_WRITES = 300
MAX_SECONDS = 10.0


def _registry() -> RegistryProto:
    proto = RegistryProto()
    for k in range(VIEWS):
        view = proto.feature_views.add()
        view.spec.name = f"view_{k:04d}"
        view.spec.project = "marn"
    return proto


def _torn_reads(store_class: type[FileRegistryStore], path: Path) -> tuple[int, int]:
    """(reads that saw fewer than all views, reads) while another thread rewrites the registry."""
    store = store_class(RegistryConfig(path=str(path)), path.parent)
    proto = _registry()
    store.update_registry_proto(proto)
    done = threading.Event()

    def write() -> None:
        deadline = time.monotonic() + MAX_SECONDS
        for _ in range(MAX_WRITES):
            if time.monotonic() > deadline:
                break
            store.update_registry_proto(proto)
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    torn = reads = 0
    while not done.is_set():
        seen = RegistryProto()
        try:
            seen.ParseFromString(path.read_bytes())
        except Exception:  # a cut inside a field: also a torn read
            seen = RegistryProto()
        reads += 1
        torn += len(seen.feature_views) != VIEWS
    writer.join(MAX_SECONDS)
    return torn, reads


def test_readers_see_the_old_or_the_new_registry_whole(tmp_path):
    torn, reads = _torn_reads(AtomicFileRegistryStore, tmp_path / "registry.db")
    assert reads > 0 and torn == 0
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_feasts_own_file_store_is_torn_under_the_same_race(tmp_path):
    """The race the atomic store closes is real: Feast's store truncates and rewrites in place."""
    torn, reads = _torn_reads(FileRegistryStore, tmp_path / "registry.db")
    if reads < 50:
        pytest.skip(f"only {reads} reads raced the writer: too few to show the race on this machine")
    assert torn > 0


def test_feast_loads_the_store_named_in_feature_store_yaml():
    assert get_registry_store_class_from_type(ATOMIC_FILE_REGISTRY_STORE) is AtomicFileRegistryStore
