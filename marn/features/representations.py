"""Versioned item representations (paper 4.9.2): which models serve them, and publishing and dropping a
model version's view. A view's name carries the version (``item_representations_marn_v0003``) because the
representations are only valid with the weights that made them."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from marn.features.repo import feature_services, open_store, representations_feature_view
from marn.features.tables import (
    ITEM_ATTRIBUTES,
    REP_COLUMN,
    REPRESENTATIONS_VIEW,
    TIMESTAMP,
    representations_view,
    static_times,
    table_path,
)


def serves_representations(model: str) -> bool:
    """Whether the registered model ``model`` (a registry name) is scored from precomputed item
    representations: MARN with APGRU, whose rep = s + c splits into a time-invariant part published to Feast
    and the statistics' part added at request time. Registration publishes them; its scorer reads them."""
    from marn.models.marn import VARIANTS  # torch: only when asked

    variant = VARIANTS.get(model)
    return variant is not None and variant.sequence == "apgru"


def write_item_representations(
    repo_dir: str | Path,
    item_ids: Sequence[str],
    vectors: np.ndarray,
    ts: datetime,
    *,
    model: str,
    version: str,
) -> Path:
    """Store ``model`` ``version``'s precomputed item representations (paper 4.9.2) stamped ``ts`` in
    their own view (:func:`representations_view`) and materialize them online; other versions' views are
    left as they are. Adds the view to marn_v1. Needs an applied repo (materialize_features). Returns the
    table's path.
    """
    view = representations_view(model, version)
    if len(item_ids) == 0:
        raise ValueError("no item representations to write")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(item_ids):
        raise ValueError(f"vectors must be (len(item_ids)={len(item_ids)}, dim); got shape {vectors.shape}")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item_ids has duplicates: one representation per item")
    if not np.isfinite(vectors).all():
        raise ValueError("item representations contain NaN or infinite values")
    stamp = pd.Timestamp(ts)
    if stamp.tzinfo is None:
        raise ValueError(f"ts must be timezone-aware (UTC), got {ts!r}")
    stamp = stamp.tz_convert("UTC").as_unit("us")

    store = open_store(repo_dir)
    # Beside the other tables, wherever they are (feature_repo/definitions.py may point elsewhere).
    tables_dir = Path(store.get_feature_view(ITEM_ATTRIBUTES).batch_source.path).parent
    path = table_path(tables_dir, view)
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), pa.float32())
    table = pa.table(
        {
            "item_id": pa.array([str(i) for i in item_ids], pa.string()),
            TIMESTAMP: static_times(len(item_ids), stamp),
            REP_COLUMN: pa.FixedSizeListArray.from_arrays(flat, dim).cast(pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, path)

    views = {v.name: v for v in store.list_feature_views()}
    views[view] = representations_feature_view(tables_dir, view, store.get_entity("item"))
    store.apply([views[view].batch_source, views[view], *feature_services(views)])
    store.materialize(start_date=stamp.to_pydatetime(), end_date=stamp.to_pydatetime(), feature_views=[view])
    return path


def delete_item_representations(repo_dir: str | Path, model: str, keep: Collection[str]) -> list[str]:
    """Drop every representations view of ``model`` whose version is not in ``keep``: from the registry
    and marn_v1, its online rows (Feast deletes a deleted view's online table or Redis fields) and its
    offline table. Returns the dropped views' names."""
    store = open_store(repo_dir)
    views = {v.name: v for v in store.list_feature_views()}
    stale = []
    for name in views:
        match = REPRESENTATIONS_VIEW.match(name)
        if match and match["model"] == model and match["version"] not in keep:
            stale.append(name)
    if not stale:
        return []
    remaining = {name: view for name, view in views.items() if name not in stale}
    doomed = [views[name] for name in stale]
    store.apply(
        feature_services(remaining),
        objects_to_delete=[*doomed, *(v.batch_source for v in doomed)],
        partial=False,
    )
    for view in doomed:
        Path(view.batch_source.path).unlink(missing_ok=True)
    return stale
