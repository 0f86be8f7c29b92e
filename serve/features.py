"""Feast online lookups for the scorers: a user's latest behaviour sequence and the items' rows.

Items change slowly (attributes, image vectors, MARN's precomputed representations, and the statistics,
which the pipeline snapshots daily), so their rows are kept for ``item_cache_s`` seconds; a request after
warm-up reads only its user's sequence from Feast. Unknown users and items come back empty, never as
errors (cold start).

Representations belong to one model version (marn.features.representations_view): a MARN scorer reads
them through ``with_representations(its version's view)`` and never sees another version's.
"""

from __future__ import annotations

import copy
import logging
import math
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from marn.features.repo import open_store
from marn.features.tables import (
    HISTORY_COLUMNS,
    ITEM_ATTRIBUTES,
    ITEM_EMBEDDINGS,
    ITEM_STATS,
    REP_COLUMN,
    USER_SEQUENCES,
)

log = logging.getLogger(__name__)

ITEM_FEATURES = (  # what a scorer needs of an item; views that are absent (no embed stage) are skipped
    (ITEM_ATTRIBUTES, ("category_id", "brand_id", "shop_id")),
    (ITEM_EMBEDDINGS, ("image_embedding",)),
    (ITEM_STATS, None),  # every statistic the view serves: the newest snapshot, as of now
)


@dataclass(frozen=True)
class UserHistory:
    items: list[str]  # oldest first
    behaviors: list[str]
    ts_us: list[int] | None  # behaviour times (µs since the epoch); None when the caller gave the history


EMPTY_HISTORY = UserHistory([], [], [])


class FeatureFetcher:
    """Reads the Feast online store of the repo at ``repo_dir`` (sqlite locally, Redis on a cluster)."""

    def __init__(
        self,
        repo_dir: str | Path,
        item_cache_s: float = 60.0,
        max_cached_items: int = 200_000,
        max_cached_unknown: int = 20_000,
    ):
        """``max_cached_items`` rows of items Feast knows and ``max_cached_unknown`` ids it does not are
        kept, each bounded on its own (the oldest read goes first): made-up candidate ids, which any client
        can send, never push out the catalogue's rows."""
        if not (Path(repo_dir) / "feature_store.yaml").exists():
            raise FileNotFoundError(f"{repo_dir}: no feature_store.yaml; run the pipeline's features stage")
        self.store = open_store(repo_dir)  # with the Redis password from the environment, if any
        views = {view.name: view for view in self.store.list_feature_views()}
        self.item_refs = [
            f"{view}:{feature.name}"
            for view, names in ITEM_FEATURES
            if view in views
            for feature in views[view].features
            if names is None or feature.name in names
        ]
        self.representations: str | None = None  # the one representations view these item rows carry
        self.item_cache_s = item_cache_s
        self.max_cached_items, self.max_cached_unknown = max_cached_items, max_cached_unknown
        # item_id -> (read at, row), oldest read first; ids Feast has no value for -> read at, apart.
        self._items: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()

    def histories(self, user_ids: Sequence[str]) -> list[UserHistory]:
        """The latest materialized sequence of each user (oldest first); empty for unknown users."""
        rows = self.store.get_online_features(
            features=[f"{USER_SEQUENCES}:{name}" for name in HISTORY_COLUMNS],
            entity_rows=[{"user_id": u} for u in user_ids],
        ).to_dict()
        out = []
        for items, behaviors, times in zip(*(rows[name] for name in HISTORY_COLUMNS), strict=True):
            if not items:
                out.append(EMPTY_HISTORY)
                continue
            out.append(UserHistory(list(items), list(behaviors), [_micros(t) for t in times]))
        return out

    def with_representations(self, view: str) -> FeatureFetcher | None:
        """A fetcher on the same store whose item rows also carry ``view``'s ``item_rep`` (one model
        version's representations, marn.features.representations_view); None when Feast has no such view.
        It has a cache of its own, so a fetcher shared by two arms is not changed."""
        if view not in {v.name for v in self.store.list_feature_views(allow_cache=False)}:
            return None
        self.store.refresh_registry()  # online reads resolve the view through the cached registry
        other = copy.copy(self)
        other.item_refs = [*self.item_refs, f"{view}:{REP_COLUMN}"]
        other.representations, other._items, other._unknown = view, OrderedDict(), OrderedDict()
        return other

    def items(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """item_id -> {feature: value or None} for every distinct id asked; cached for item_cache_s."""
        now = time.monotonic()
        fresh = now - self.item_cache_s
        names = [ref.split(":", 1)[1] for ref in self.item_refs]
        # The answer is built before anything is evicted, so every id asked is in it however full the
        # caches are (one request may even ask for more ids than they hold).
        answer: dict[str, dict[str, Any]] = {}
        wanted = []
        for item in dict.fromkeys(item_ids):
            if self._items.get(item, (-math.inf, None))[0] >= fresh:
                answer[item] = self._items[item][1]
            elif self._unknown.get(item, -math.inf) >= fresh:
                answer[item] = dict.fromkeys(names)
            else:
                wanted.append(item)
        if wanted:
            rows = self._item_rows(wanted)
            names = [ref.split(":", 1)[1] for ref in self.item_refs]  # a deleted view may have been dropped
            for k, item in enumerate(wanted):
                row = {name: _vector_or_value(rows[name][k]) for name in names}
                answer[item] = row
                self._items.pop(item, None)  # re-inserted at the end: the order stays oldest read first
                self._unknown.pop(item, None)
                if all(value is None for value in row.values()):
                    self._unknown[item] = now
                else:
                    self._items[item] = (now, row)
            _evict_oldest(self._items, self.max_cached_items)
            _evict_oldest(self._unknown, self.max_cached_unknown)
        return {item: answer[item] for item in dict.fromkeys(item_ids)}  # in the order asked

    def _item_rows(self, item_ids: list[str]) -> dict[str, list[Any]]:
        from feast.errors import FeatureViewNotFoundException

        entity_rows = [{"item_id": i} for i in item_ids]
        try:
            return self.store.get_online_features(features=self.item_refs, entity_rows=entity_rows).to_dict()
        except (sqlite3.OperationalError, FeatureViewNotFoundException) as err:
            if self.representations is None:
                raise
            # The version's view was deleted (it is no longer the champion or its predecessor): read on
            # without it; the scorer then computes the representations from its own weights.
            log.warning("%s is gone (%r): item rows without it", self.representations, err)
            self.item_refs = [ref for ref in self.item_refs if not ref.startswith(f"{self.representations}:")]
            return self.store.get_online_features(features=self.item_refs, entity_rows=entity_rows).to_dict()


def _evict_oldest(cache: OrderedDict, limit: int) -> None:
    """Drop the oldest reads past ``limit`` (entries are inserted in read order, so stale ones go first)."""
    while len(cache) > limit:
        cache.popitem(last=False)


def _micros(value: Any) -> int:
    """A Feast online timestamp (datetime, or seconds as a number) -> µs since the epoch."""
    if hasattr(value, "timestamp"):
        return round(value.timestamp() * 1e6)
    return round(float(value) * 1e6)


def _vector_or_value(value: Any) -> Any:
    """Lists of numbers (image vectors, representations) become float32 arrays once, when cached."""
    if isinstance(value, list) and value and isinstance(value[0], float | int):
        return np.asarray(value, dtype=np.float32)
    return value
