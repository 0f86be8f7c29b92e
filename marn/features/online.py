"""Serving lookups from Feast's online store: the users' latest sequences and the items' features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from marn.features.repo import open_store
from marn.features.tables import HISTORY_COLUMNS, USER_SEQUENCES


@dataclass(frozen=True)
class OnlineFeatures:
    # user_id, hist_item_ids, hist_behaviors, hist_ts (whole seconds: Feast's online timestamp type);
    # None for unknown users
    users: pd.DataFrame
    items: pd.DataFrame  # item_id and every item feature registered; None for unknown items


def online_features(repo_dir: str | Path, user_ids: Sequence[str], item_ids: Sequence[str]) -> OnlineFeatures:
    """Serving lookups from the online store: the users' latest sequences and the items' features, in
    request order. Unknown ids come back with null features (cold start), not as errors."""
    store = open_store(repo_dir)
    views = {v.name: v for v in store.list_feature_views()}
    item_refs = [
        f"{name}:{f.name}" for name, view in views.items() if "item" in view.entities for f in view.features
    ]
    user_refs = [f"{USER_SEQUENCES}:{name}" for name in HISTORY_COLUMNS]

    def lookup(key: str, ids: Sequence[str], refs: list[str]) -> pd.DataFrame:
        if not ids:
            return pd.DataFrame({key: pd.Series(dtype=str)})
        rows = [{key: str(i)} for i in ids]
        return store.get_online_features(features=refs, entity_rows=rows).to_df()

    return OnlineFeatures(
        users=lookup("user_id", user_ids, user_refs), items=lookup("item_id", item_ids, item_refs)
    )
