"""One A/B arm's scorer, without Ray: a registered model plus Feast lookups -> click probabilities.

Statistics: every item of a request (candidate or history) is read with its newest statistic snapshot
from Feast's online store, the same item_stats rows the offline samples were joined with, and bucketed
with the boundaries the model was trained with. An item Feast does not know has zero counts.

MARN (paper 4.9.2): rep = s + c splits exactly into a part of every modality but the statistics, which
registration precomputes into Feast, and the statistics' part, added here from the item's current counts
(``MARN.represent_from_static``). The precomputed part is read only from the view of this scorer's own
model version (marn.features.tables.representations_view), so a registration while it runs changes nothing it
reads; should its version's view be deleted under it, it computes that part from its own weights. The
online path then runs only APGRU, candidate attention and the prediction MLP, with the GRU run once per
user rather than once per candidate. Other models (the DUPN baseline) run their full forward on the
request expanded to one row per candidate.

Cold start: an unknown user has an empty history. An item the model never saw gets its known features
from Feast (category, brand, shop, image vector) and defaults for the rest; an item Feast does not know
either is the padding item. Neither is an error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from marn.data.schema import BEHAVIORS
from marn.data.stats import STAT_PREFIX
from marn.data.tensors import PAD, Vocab, gap_buckets
from marn.embed.courier import CourierHead
from marn.features.representations import serves_representations
from marn.features.tables import REP_COLUMN, representations_view
from marn.models.layers import ItemModalities, ItemStates
from marn.registry import registered_version
from marn.train import load_trained
from serve.features import EMPTY_HISTORY, FeatureFetcher, UserHistory

log = logging.getLogger(__name__)

DEFAULT_BEHAVIOR = "click"  # a caller-supplied history is item ids only: taken as clicks, time unknown
REP_CHECK_ITEMS = 32  # items compared between Feast's representations and the model at start-up
REP_CHECK_TOLERANCE = 1e-4
IMAGE_CHECK_AGREEING = 0.9  # share of sampled items whose Feast image vector must give their trained row


def cold_image_rows(
    vectors: Sequence[Sequence[float] | None], width: int, encoder: CourierHead | None = None
) -> tuple[torch.Tensor, int]:
    """Feast's image vectors (the embed stage's backbone; None: no poster) of K items a model never saw ->
    (K, ``width``) rows of the model's image table, and how many vectors were left out for their width.

    A model trained on the backbone's vectors reads them as they are; one trained on COURIER's reads them
    through its ``encoder`` (the head that wrote its table), so a new item lands in the same space as the
    items it was trained with. A missing vector, or one of another width (a pixel-feature model, another
    backbone), gives zeros, as for an item without a poster."""
    read = encoder.in_dim if encoder is not None else width
    raw = np.zeros((len(vectors), read), dtype=np.float32)
    usable = np.array([v is not None and len(v) == read for v in vectors], dtype=bool)
    for k in np.flatnonzero(usable):
        raw[k] = vectors[k]
    mismatched = sum(v is not None for v in vectors) - int(usable.sum())  # present, of another width
    if encoder is None:
        return torch.from_numpy(raw), mismatched
    rows = torch.zeros(len(vectors), width)
    if usable.any():
        with torch.no_grad():
            rows[torch.from_numpy(usable)] = encoder(torch.from_numpy(raw[usable]))  # (K', width)
    return rows, mismatched


class ScoringError(RuntimeError):
    """A request its arm could not score. ``ArmScorer.score_each`` returns it in that request's place rather
    than raising, so the other requests of its micro-batch keep their answers; the router raises it."""


@dataclass(frozen=True)
class ScoreRequest:
    user_id: str
    candidates: list[str]
    history: list[str] | None = None  # the caller's recent item ids, newest last; None: read Feast


def _scoring_error(request: ScoreRequest, err: Exception) -> ScoringError:
    log.warning("scoring %d candidates for a user failed: %r", len(request.candidates), err)
    return ScoringError(f"{type(err).__name__}: {str(err)[:300]}")  # a plain message: it crosses Ray


class ArmScorer:
    """Scores requests for one arm: ``score(requests, now_us) -> [[probability per candidate], ...]``."""

    def __init__(
        self,
        checkpoint: str | Path,
        fetcher: FeatureFetcher,
        max_history: int,
        max_cold_items: int = 10_000,
        version: str | None = None,
    ):
        """``version``: the checkpoint's registry version (default: from the model card beside it), whose
        item representations a MARN scorer reads."""
        trained = load_trained(checkpoint)
        self.name, self.model, self.catalog = trained.name, trained.model, trained.catalog
        self.statistics, self.image_encoder = trained.statistics, trained.image_encoder
        self.fetcher, self.max_history, self.max_cold_items = fetcher, max_history, max_cold_items
        self.behaviors = Vocab(BEHAVIORS)
        # item id the model never saw -> its code (added by ItemModalities.extend), least recently used first:
        # when all max_cold_items slots are taken, the least recently used are given to new cold items
        self._cold: OrderedDict[str, int] = OrderedDict()
        self.cold_reused = 0  # slots given to another item since start (logged)
        self.uses_representations = serves_representations(self.name)
        self.version = version
        if self.uses_representations:
            self.version = version if version is not None else registered_version(checkpoint)
            view = representations_view(self.name, self.version)
            own = fetcher.with_representations(view)
            if own is None:
                raise FileNotFoundError(
                    f"the Feast repo has no {view} view: register {self.name} {self.version} through the "
                    "pipeline (it publishes the version's rep = s + c before the version becomes champion)"
                )
            self.fetcher = own
            self._check_representations()
        # Cold items read Feast's image vectors (through the COURIER head when the model has one): only
        # when those are the vectors this model was trained on (review COURIER #6).
        self.cold_images = self._image_vectors_match()

    # -- public ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, requests: Sequence[ScoreRequest], now_us: int) -> list[list[float]]:
        histories = self.histories(requests, now_us)
        codes = self.item_codes(
            [i for r, h in zip(requests, histories, strict=True) for i in (*r.candidates, *h.items)]
        )
        stats = self.item_stats(codes)
        if self.uses_representations:
            logits = self._score_from_representations(requests, histories, codes, stats, now_us)
        elif hasattr(self.model, "score_users"):  # a sequence run once per user (DUPN)
            counts = torch.tensor([len(r.candidates) for r in requests])
            logits = self.model.score_users(
                self._history_tensors(histories, codes, stats, now_us),
                self._states([i for r in requests for i in r.candidates], codes, stats),
                counts,
            )
        else:
            logits = self.model(self.expanded_batch(requests, histories, codes, stats, now_us)).logits
        probabilities = torch.sigmoid(logits).tolist()
        out, start = [], 0
        for r in requests:
            out.append(probabilities[start : start + len(r.candidates)])
            start += len(r.candidates)
        return out

    def score_each(self, requests: Sequence[ScoreRequest], now_us: int) -> list[list[float] | ScoringError]:
        """:meth:`score`, with a request that fails answered by its own :class:`ScoringError`: the
        micro-batch is scored together, and only when that fails is each request scored alone."""
        try:
            return list(self.score(requests, now_us))
        except Exception as err:
            if len(requests) == 1:
                return [_scoring_error(requests[0], err)]
            log.warning("%s: a batch of %d failed (%r); scoring each alone", self.name, len(requests), err)
        out: list[list[float] | ScoringError] = []
        for request in requests:
            try:
                out.extend(self.score([request], now_us))
            except Exception as err:
                out.append(_scoring_error(request, err))
        return out

    def histories(self, requests: Sequence[ScoreRequest], now_us: int) -> list[UserHistory]:
        """The caller's history when given, else the user's latest sequence from Feast (before now); only
        the newest ``max_history`` items, the ones the model reads, so older ones are never looked up."""
        lookup = [r.user_id for r in requests if r.history is None]
        found = iter(self.fetcher.histories(lookup) if lookup else [])
        out = []
        for r in requests:
            if r.history is not None:
                items = r.history[max(len(r.history) - self.max_history, 0) :]
                out.append(UserHistory(list(items), [DEFAULT_BEHAVIOR] * len(items), None))
                continue
            history = next(found)
            times = history.ts_us
            # Only what happened before the request (replays of the past), and of that the newest.
            keep = [k for k in range(len(history.items)) if times is None or times[k] < now_us]
            keep = keep[max(len(keep) - self.max_history, 0) :]
            if len(keep) < len(history.items):
                history = UserHistory(
                    [history.items[k] for k in keep],
                    [history.behaviors[k] for k in keep],
                    None if times is None else [times[k] for k in keep],
                )
            out.append(history if history.items else EMPTY_HISTORY)
        return out

    def expanded_batch(
        self,
        requests: Sequence[ScoreRequest],
        histories: Sequence[UserHistory],
        codes: dict[str, int],
        stats: dict[str, np.ndarray],
        now_us: int,
    ) -> dict[str, torch.Tensor]:
        """One row per candidate, the user's history repeated: the tensors ``encode_samples`` makes."""
        history = self._history_tensors(histories, codes, stats, now_us)
        counts = torch.tensor([len(r.candidates) for r in requests])
        rows = torch.repeat_interleave(torch.arange(len(requests)), counts)
        batch = {name: t[rows] for name, t in history.items()}
        candidates = self._states([i for r in requests for i in r.candidates], codes, stats)
        batch["item"], batch["item_stats"] = candidates.items, candidates.stats
        return batch

    def item_stats(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Item id -> (F, G) bucket codes of its newest statistics in Feast's online store, in the model's
        statistic order; an item without a row has zero counts and missing static values, as offline."""
        rows = self.fetcher.items(list(item_ids))
        names = self.statistics.names
        values = np.full((len(item_ids), len(names)), np.nan)
        for k, item in enumerate(item_ids):
            row = rows[item]
            for j, name in enumerate(names):
                value = row.get(name)
                if value is None and name.startswith(STAT_PREFIX):
                    value = 0.0  # nothing counted yet
                if value is not None:
                    values[k, j] = float(value)
        codes = self.statistics.transform(values)  # (K, F, G)
        return dict(zip(item_ids, codes, strict=True))

    def _states(
        self, item_ids: Sequence[str], codes: dict[str, int], stats: dict[str, np.ndarray]
    ) -> ItemStates:
        items = torch.tensor([codes[i] for i in item_ids], dtype=torch.long)
        shape = (len(item_ids), self.statistics.n_stats, len(self.statistics.buckets))
        values = np.stack([stats[i] for i in item_ids]) if item_ids else np.zeros(shape, dtype=np.int16)
        return ItemStates(items, torch.from_numpy(values))

    # -- internals -------------------------------------------------------------------------------------

    def _score_from_representations(
        self,
        requests: Sequence[ScoreRequest],
        histories: Sequence[UserHistory],
        codes: dict[str, int],
        stats: dict[str, np.ndarray],
        now_us: int,
    ) -> torch.Tensor:
        reps = self._representations(codes, stats)  # item id -> (D,)
        tensors = self._history_tensors(histories, codes, stats, now_us)
        dim = self.model.cfg.rep_dim
        history = torch.zeros(len(requests), tensors["hist_items"].shape[1], dim)  # (R, L, D)
        for row, h in enumerate(histories):
            for col, item in enumerate(h.items[-self.max_history :]):
                history[row, col] = reps[item]
        candidates = torch.stack([reps[i] for r in requests for i in r.candidates])  # (N, D)
        counts = torch.tensor([len(r.candidates) for r in requests])
        return self.model.score_from_representations(
            history, tensors["hist_behavior"], tensors["hist_gap"], tensors["hist_len"], candidates, counts
        )

    def _representations(
        self, codes: dict[str, int], stats: dict[str, np.ndarray]
    ) -> dict[str, torch.Tensor]:
        """rep per item: Feast's precomputed time-invariant part (computed here only for items Feast has
        none for) plus the part of the item's current statistics."""
        rows = self.fetcher.items(list(codes))
        static: dict[str, torch.Tensor] = {}
        missing = []
        for item, code in codes.items():
            vector = rows[item].get(REP_COLUMN)
            if vector is not None and code != PAD and item not in self._cold:
                static[item] = torch.from_numpy(np.asarray(vector, dtype=np.float32))
            else:
                missing.append(item)
        if missing:  # cold and padding items: their representation from known features and defaults
            computed = self.model.static_parts(torch.tensor([codes[i] for i in missing], dtype=torch.long))
            static.update(zip(missing, computed, strict=True))
        items = list(codes)
        reps = self.model.represent_from_static(
            torch.stack([static[i] for i in items]), self._states(items, codes, stats)
        )  # (K, D)
        return dict(zip(items, reps, strict=True))

    def _history_tensors(
        self,
        histories: Sequence[UserHistory],
        codes: dict[str, int],
        stats: dict[str, np.ndarray],
        now_us: int,
    ) -> dict[str, torch.Tensor]:
        """Left-aligned (R, L) item, behaviour and time-gap codes, (R, L, F, G) statistic codes and (R,)
        lengths; the newest kept."""
        width = max([min(len(h.items), self.max_history) for h in histories] + [1])
        items = np.zeros((len(histories), width), dtype=np.int64)
        behaviors, gaps = np.zeros_like(items), np.zeros_like(items)
        item_stats = np.zeros((*items.shape, self.statistics.n_stats, len(self.statistics.buckets)), np.int16)
        lengths = np.zeros(len(histories), dtype=np.int64)
        for row, h in enumerate(histories):
            keep = slice(max(len(h.items) - self.max_history, 0), None)
            kept = h.items[keep]
            n = len(kept)
            lengths[row] = n
            if n == 0:
                continue
            items[row, :n] = [codes[i] for i in kept]
            item_stats[row, :n] = [stats[i] for i in kept]
            behaviors[row, :n] = self.behaviors.encode(h.behaviors[keep])
            if h.ts_us is not None:
                gaps[row, :n] = gap_buckets(np.full(n, now_us), np.asarray(h.ts_us[keep]))
        return {
            "hist_items": torch.from_numpy(items),
            "hist_stats": torch.from_numpy(item_stats),
            "hist_behavior": torch.from_numpy(behaviors),
            "hist_gap": torch.from_numpy(gaps),
            "hist_len": torch.from_numpy(lengths),
        }

    def item_codes(self, item_ids: Sequence[str]) -> dict[str, int]:
        """Item id -> the model's code: the catalogue's, a cold item's added code, or PAD."""
        distinct = list(dict.fromkeys(item_ids))
        known = self.catalog.items.encode(distinct)
        codes = dict(zip(distinct, known.tolist(), strict=True))
        unseen = [i for i, c in codes.items() if c == PAD]
        for item in unseen:
            if item in self._cold:
                self._cold.move_to_end(item)  # in use: the last to be given away
        new = [i for i in unseen if i not in self._cold]
        if new:
            self._add_cold_items(new[: self.max_cold_items], in_use=set(unseen))
        for item in unseen:
            codes[item] = self._cold.get(item, PAD)
        return codes

    def _add_cold_items(self, item_ids: list[str], in_use: set[str]) -> None:
        """Give items the model never saw their known features: attributes and image vector from Feast, in
        new rows while fewer than ``max_cold_items`` are taken, then in the rows of the least recently used
        cold items not ``in_use`` by this call (so one client's flood of cold ids cannot leave every later
        new item scored as padding)."""
        embedding = getattr(self.model, "embedding", None)
        if not isinstance(embedding, ItemModalities):  # a model without modality tables: PAD it is
            return
        rows = self.fetcher.items(item_ids)
        known = [i for i in item_ids if any(v is not None for v in rows[i].values())]
        if not known:
            return
        attributes = np.zeros((len(known), 3), dtype=np.int64)
        for j, (column, vocab) in enumerate(
            (
                ("category_id", self.catalog.categories),
                ("brand_id", self.catalog.brands),
                ("shop_id", self.catalog.shops),
            )
        ):
            attributes[:, j] = vocab.encode([rows[i].get(column) for i in known])
        vectors = [rows[i].get("image_embedding") if self.cold_images else None for i in known]
        image, mismatched = cold_image_rows(vectors, embedding.image.shape[1], self.image_encoder)
        if mismatched:  # a missing vector is an item without a poster; another width is a setup to know of
            log.warning(
                "%s: %d cold items' Feast image vectors are not of the width this model reads; zeros",
                self.name,
                mismatched,
            )
        fresh = min(len(known), self.max_cold_items - len(self._cold))
        if fresh:
            new_codes = embedding.extend(torch.from_numpy(attributes[:fresh]), image[:fresh])
            self._cold.update(zip(known[:fresh], new_codes.tolist(), strict=True))
        victims = [i for i in self._cold if i not in in_use][: len(known) - fresh]
        if victims:
            reused = [self._cold.pop(v) for v in victims]
            taken = slice(fresh, fresh + len(victims))
            embedding.overwrite(torch.tensor(reused), torch.from_numpy(attributes[taken]), image[taken])
            self._cold.update(zip(known[taken], reused, strict=True))
            self.cold_reused += len(victims)
            log.warning(
                "%s: all %d cold-item slots taken: %d least recently used given to new items (%d so far)",
                self.name,
                self.max_cold_items,
                len(victims),
                self.cold_reused,
            )
        log.info("%s: %d cold items added from their Feast features", self.name, fresh + len(victims))

    def _image_vectors_match(self) -> bool:
        """Whether Feast's image vectors are the ones this model's image table was built from: for the
        first catalogue items with a vector, the row a cold item would get (``cold_image_rows``, through the
        COURIER head when there is one) must equal the item's trained row. Feast re-embedded with another
        backbone since training would put cold items in another space: they then get no image (as an item
        without a poster), with a warning; the trained items are unaffected."""
        embedding = getattr(self.model, "embedding", None)
        if not isinstance(embedding, ItemModalities):
            return True
        sample = list(self.catalog.items.values[:REP_CHECK_ITEMS])
        rows = self.fetcher.items(sample)
        found = [(code, rows[i].get("image_embedding")) for code, i in enumerate(sample, start=1)]
        found = [(code, vector) for code, vector in found if vector is not None]
        if not found:
            return True  # no posters to compare: cold items have none either
        image, _ = cold_image_rows([v for _, v in found], embedding.image.shape[1], self.image_encoder)
        trained = embedding.image[torch.tensor([code for code, _ in found])]
        agreeing = float(((image - trained).abs().amax(dim=1) <= REP_CHECK_TOLERANCE).float().mean())
        if agreeing < IMAGE_CHECK_AGREEING:
            log.warning(
                "%s: Feast's image vectors give the trained rows for %.0f%% of %d sampled items: not the "
                "vectors (backbone) this model was trained on; cold items get no image until the model is "
                "retrained on them",
                self.name,
                100 * agreeing,
                len(found),
            )
            return False
        return True

    def _check_representations(self) -> None:
        """Feast's representations must be this model's: a stale publication would serve wrong scores."""
        sample = list(self.catalog.items.values[:REP_CHECK_ITEMS])
        rows = self.fetcher.items(sample)
        stored = [rows[i].get(REP_COLUMN) for i in sample]
        if any(v is None for v in stored):
            raise RuntimeError(
                f"Feast has no representation for {sum(v is None for v in stored)} of the first "
                f"{len(sample)} catalogue items in {self.fetcher.representations}: publish them for this "
                "model version (register it through the pipeline)"
            )
        with torch.no_grad():
            expected = self.model.static_parts(torch.arange(1, len(sample) + 1))
        gap = float((torch.from_numpy(np.stack(stored)) - expected).abs().max())
        if gap > REP_CHECK_TOLERANCE:
            raise RuntimeError(
                f"Feast's {self.fetcher.representations} differ from this {self.name} model's by up to "
                f"{gap:.3g}: they were published for another version; re-publish them (register this version)"
            )
