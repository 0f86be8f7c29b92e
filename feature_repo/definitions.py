"""Adapter for the ``feast`` CLI and feature server: the objects of marn.features.repo.feature_definitions as
module globals (Feast collects the Feast objects it finds at module level of the repo's Python files).

Tables come from ``MARN_FEATURE_TABLES`` (default ``data/`` beside this file; a relative path is taken
relative to this directory), the config from ``MARN_CONFIG`` (default: built-in). Build the tables first
with ``marn.features.tables.build_feature_tables`` (``materialize_features`` does it for the generated repo).
"""

from __future__ import annotations

import os
from pathlib import Path

from marn.config import load_config
from marn.features.repo import DUPN_SERVICE, MARN_SERVICE, feature_definitions
from marn.features.tables import (
    ITEM_ATTRIBUTES,
    ITEM_EMBEDDINGS,
    ITEM_STATS,
    REPRESENTATIONS_VIEW,
    USER_SEQUENCES,
)

_REPO = Path(__file__).resolve().parent
_tables = Path(os.environ.get("MARN_FEATURE_TABLES", "data"))
_objects = {
    obj.name: obj
    for obj in feature_definitions(
        _tables if _tables.is_absolute() else _REPO / _tables, load_config(os.environ.get("MARN_CONFIG"))
    )
}

user = _objects["user"]
item = _objects["item"]
user_sequences = _objects[USER_SEQUENCES]
item_attributes = _objects[ITEM_ATTRIBUTES]
item_stats = _objects[ITEM_STATS]
item_embeddings = _objects.get(ITEM_EMBEDDINGS)  # None until the embed stage has written vectors
# One view per published MARN version (item_representations_marn_v0003 ...), each a module global under
# its own name, so that `feast apply` here keeps every version registration published (none before the first).
globals().update({name: obj for name, obj in _objects.items() if REPRESENTATIONS_VIEW.match(name)})
marn_v1 = _objects[MARN_SERVICE]
dupn_v1 = _objects[DUPN_SERVICE]
