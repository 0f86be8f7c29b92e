"""Layers shared by MARN and the baselines.

Notation used in every shape comment of ``marn/models``:
B batch, L history length, U distinct item states in a batch (an item with its statistics as of the
sample's time), M modalities, D a model width, H title tokens, F item statistics, G their granularities,
P behaviour-property width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.schema import BEHAVIORS
from marn.data.stats import StatDiscretizer
from marn.data.tensors import GAP_BUCKETS, ItemCatalog
from marn.models.base import shared_tensor

MODALITIES = ("ids", "image", "title", "stats")  # paper 3.1.1, in the paper's order


# --------------------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------------------


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer (Ganin & Lempitsky 2015): identity forward, gradient * -scale backward."""
    return _ReverseGradient.apply(x, scale)


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) per hidden width, then an optional linear output layer."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        if out_dim is not None:
            layers.append(nn.Linear(in_dim, out_dim))
            in_dim = out_dim
        super().__init__(*layers)
        self.out_dim = in_dim

    def after_first(self, x: torch.Tensor) -> torch.Tensor:
        """The layers after the first Linear: for callers that compute that layer in parts."""
        for layer in list(self)[1:]:
            x = layer(x)
        return x


def glorot_init(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases for every Linear and Conv1d, TensorFlow's defaults.

    The paper's models are TensorFlow models trained with AdaGrad at lr 0.1; with PyTorch's smaller
    default init the deeper models (a GRU behind two projections) barely move in the first epochs.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def sequence_mask(hist_len: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, L) bool, True on real (left-aligned) behaviours."""
    return torch.arange(max_len, device=hist_len.device)[None, :] < hist_len[:, None]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``mask``; rows with nothing to attend to get all zeros, not NaN."""
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) -> (B, D): the mean over real behaviours (zeros for an empty history)."""
    weights = mask.float()
    return (values * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1.0)


def last_state(outputs: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
    """(B, L, D) outputs of a left-aligned sequence -> (B, D) the output at each row's last behaviour."""
    index = (hist_len - 1).clamp(min=0)
    state = outputs[torch.arange(outputs.shape[0], device=outputs.device), index]
    return state * (hist_len > 0)[:, None].float()


def packing_pays(hist_len: torch.Tensor, width: int) -> bool:
    """Whether an RNN over left-aligned histories should run packed (real steps only) rather than padded
    (every column; the padding steps come after every real one and change none of them).

    Measured on CPU under autograd (MARN's APGRU, 128 histories of up to 50 steps), a packed step costs
    about 3.5 times a padded one: the packed kernel slices its input per step, and each slice's backward
    fills a zero tensor of the whole input. Padded won even with only a third of the cells real; pack
    only when fewer than a quarter are."""
    return 4 * int(hist_len.clamp(min=1).sum()) < len(hist_len) * width


def run_gru(gru: nn.GRU | nn.LSTM, inputs: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
    """A batch_first ATen RNN over left-aligned, padded sequences; (B, L, D_in) -> (B, L, D), 0 on padding."""
    if packing_pays(hist_len, inputs.shape[1]):
        lengths = hist_len.clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        outputs, _ = gru(packed)
        outputs, _ = nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True, total_length=inputs.shape[1])
    else:
        outputs, _ = gru(inputs)
    return outputs * sequence_mask(hist_len, inputs.shape[1])[..., None].float()


class CandidateAttention(nn.Module):
    """DIN's activation unit: score_t = MLP([h_t, q, h_t - q, h_t * q]); the candidate q is the query.

    ``normalize=True`` applies a masked softmax (APGRU, DUPN, DIEN); DIN itself keeps raw weights.
    """

    def __init__(self, dim: int, hidden: Sequence[int], normalize: bool = True):
        super().__init__()
        self.score = MLP(4 * dim, hidden, out_dim=1)
        self.normalize = normalize

    def weights(
        self, keys: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, which: torch.Tensor | None = None
    ) -> torch.Tensor:
        """keys (K, L, D) and mask (K, L) of K histories, queries (B, D) and ``which`` (B,), the history of
        each query (None: K = B, one each) -> (B, L) attention weights, 0 on padding."""
        return self._attend(keys, query, mask, which)[0]

    def forward(
        self, keys: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, which: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As :meth:`weights` -> (B, D) the weighted sum of each query's keys."""
        return self._attend(keys, query, mask, which)[1]

    def _attend(
        self, keys: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, which: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) weights and (B, D) pooled keys.

        The first layer is linear in [k, q, k - q, k * q], so it splits exactly into a key part, computed
        once per real position of each distinct history (a positive and its negative share theirs), a
        query part computed once per query rather than once per step, and the product part: about a
        quarter of the per-step work of the concatenated input (``scores_reference``). Only real positions
        are scored: histories are mostly far shorter than the batch's longest."""
        first = self.score[0]  # Linear(4D, H1)
        w_k, w_q, w_d, w_p = first.weight.split(keys.shape[-1], dim=1)  # each (H1, D)
        key_rows, key_cols = torch.nonzero(mask, as_tuple=True)  # (R_K,) each: the histories' real positions
        real_keys = keys[key_rows, key_cols]  # (R_K, D)
        per_key = F.linear(real_keys, w_k + w_d)  # (R_K, H1)
        if which is None:
            rows, cols = key_rows, key_cols
            k, key_part = real_keys, per_key
        else:  # each query's positions, and where its history's row of them is
            number = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
            number[key_rows, key_cols] = torch.arange(len(key_rows), device=mask.device)  # (K, L)
            rows, cols = torch.nonzero(take_rows(mask, which), as_tuple=True)  # (R,) each
            at = number[which[rows], cols]  # (R,)
            k, key_part = take_rows(real_keys, at), take_rows(per_key, at)  # (R, D), (R, H1)
        q = take_rows(query, rows)  # (R, D)
        hidden = key_part + take_rows(F.linear(query, w_q - w_d, first.bias), rows) + F.linear(k * q, w_p)
        real = self.score.after_first(hidden).squeeze(-1)  # (R,)
        scores = keys.new_zeros(len(query), mask.shape[1]).index_put(
            (rows, cols), real
        )  # (B, L), 0 on padding
        if self.normalize:
            query_mask = mask if which is None else take_rows(mask, which)
            weights = masked_softmax(scores, query_mask)
            real = weights[rows, cols]
        else:
            weights = scores
        pooled = keys.new_zeros(len(query), keys.shape[-1]).index_add(0, rows, real[:, None] * k)  # (B, D)
        return weights, pooled

    def scores_reference(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """(B, L) raw scores from DIN's concatenated input, as published (tests hold weights() to it)."""
        q = query[:, None, :].expand_as(keys)  # (B, L, D)
        return self.score(torch.cat([keys, q, keys - q, keys * q], dim=-1)).squeeze(-1)


# --------------------------------------------------------------------------------------------------------
# Modality embedding layer (paper 3.1)
# --------------------------------------------------------------------------------------------------------


class TitleCNN(nn.Module):
    """Kim (2014): frozen word vectors -> 1-D convolutions of windows 2, 3, 4 -> ReLU -> max over time."""

    def __init__(self, word_vectors: torch.Tensor, windows: Sequence[int], filters: int):
        super().__init__()
        self.register_buffer("word_vectors", word_vectors.float(), persistent=False)  # (V, D_word) frozen
        dim = word_vectors.shape[1]
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, w, padding=w - 1) for w in windows)
        self.out_dim = filters * len(windows)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(U, H) token codes -> (U, filters * windows): ``reference``'s numbers at a fraction of the cost.

        Three exact rewrites of conv1d -> ReLU -> max over time:
        - The word vectors are frozen, so each window offset k of a convolution is a fixed map of the
          vocabulary: project the batch's distinct words once, and a window's output is a sum of w
          looked-up rows (one ``embedding_bag`` per window size).
        - relu(max_t x_t) = max_t relu(x_t), and max's gradient reaches only the winning window of each
          (title, filter). So every window is scored without autograd, and only the winners are re-scored
          with it: the backward pass touches U x filters x w rows instead of U x steps x filters.
        - Trailing all-padding columns are dropped but one: every all-padding window scores the bias alone.
        """
        lengths = (tokens != 0).sum(1)
        keep = min(tokens.shape[1], int(lengths.max()) + 1) if len(tokens) else 1
        words, tokens = torch.unique(tokens[:, :keep], return_inverse=True)  # the batch's vocabulary
        vectors = self.word_vectors[words]  # (V', D_word); PAD (0) stays a zero row where present
        u, filters = len(tokens), self.convs[0].out_channels
        pad = int(torch.searchsorted(words, torch.zeros((), dtype=words.dtype)))  # PAD's code among words
        if pad == len(words) or int(words[pad]) != 0:  # no padding in this batch: add PAD's zero row
            vectors, pad = torch.cat([vectors, vectors.new_zeros(1, vectors.shape[1])]), len(words)
        pooled = []
        for conv in self.convs:
            w = conv.kernel_size[0]
            per_word = torch.einsum("vd,fdk->kvf", vectors, conv.weight)  # (w, V', filters)
            windows = F.pad(tokens, (w - 1, w - 1), value=pad).unfold(1, w, 1)  # (U, steps, w) codes
            rows = windows + torch.arange(w, device=tokens.device) * len(vectors)  # rows of (w V', filters)
            with torch.no_grad():
                scores = F.embedding_bag(rows.reshape(-1, w), per_word.reshape(-1, filters), mode="sum")
                value, best = scores.view(u, -1, filters).max(dim=1)  # (U, filters): the winning window
            if torch.is_grad_enabled():
                won = rows.gather(1, best[..., None].expand(-1, -1, w))  # (U, filters, w) its rows
                column = torch.arange(filters, device=tokens.device)
                value = sum(per_word.reshape(-1, filters)[won[..., k], column] for k in range(w))  # (U, F)
            pooled.append(torch.relu(value + conv.bias))  # (U, filters)
        return torch.cat(pooled, dim=1)  # (U, filters * windows)

    def reference(self, tokens: torch.Tensor) -> torch.Tensor:
        """Kim's CNN as written: conv1d over the embedded title (the tests hold ``forward`` to it)."""
        words = F.embedding(tokens, self.word_vectors).transpose(1, 2)  # (U, H) -> (U, D_word, H)
        pooled = [torch.relu(conv(words)).amax(dim=2) for conv in self.convs]  # each (U, filters)
        return torch.cat(pooled, dim=1)


def stat_code_offsets(statistics: StatDiscretizer) -> tuple[torch.Tensor, int]:
    """Rows of one shared table for every statistic and granularity: code k of (stat j, granularity g) is
    row offsets[j, g] + k, each granularity with its own 0 (missing). Returns offsets (F, G) and the rows
    per statistic."""
    per_granularity = torch.tensor([b + 1 for b in statistics.buckets], dtype=torch.long)  # (G,) codes 0..b
    starts = torch.cumsum(per_granularity, 0) - per_granularity
    per_stat = int(per_granularity.sum())
    return torch.arange(statistics.n_stats)[:, None] * per_stat + starts, per_stat


@dataclass(frozen=True)
class ItemStates:
    """Items as a model sees them: item codes and their statistics' bucket codes as of the sample's time.

    The same item is a different state on a different day (its counts moved), so everything computed per
    item is computed per state.
    """

    items: torch.Tensor  # (U,) item codes, PAD = 0
    stats: torch.Tensor  # (U, F, G) bucket codes (marn.data.stats.StatDiscretizer), 0 = missing

    def __len__(self) -> int:
        return len(self.items)


class ItemModalities(nn.Module):
    """Paper 3.1.1: item states -> one ``modality_dim`` vector e^m per modality.

    IDs: item, category, brand, shop embeddings concatenated (Eq. 1). Image: the pre-extracted vector.
    Title: Kim CNN over frozen word vectors. Statistics: one embedding per statistic and granularity of
    the state's point-in-time bucket codes. Each is then projected linearly to the common size, as the
    paper does before S_m and I.
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        modalities: Sequence[str] = MODALITIES,
    ):
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.register_buffer("attributes", shared_tensor(catalog.attributes), persistent=False)
        self.register_buffer("image", shared_tensor(features.image), persistent=False)
        self.register_buffer("title", shared_tensor(features.title), persistent=False)
        statistics = features.statistics
        offsets, per_stat = stat_code_offsets(statistics)
        self.register_buffer("stat_offsets", offsets, persistent=False)  # (F, G)

        d = cfg.modality_dim
        self.id_tables = nn.ModuleList(
            nn.Embedding(len(vocab), dim, padding_idx=0)
            for vocab, dim in (
                (catalog.items, cfg.item_dim),
                (catalog.categories, cfg.category_dim),
                (catalog.brands, cfg.brand_dim),
                (catalog.shops, cfg.shop_dim),
            )
        )
        id_width = cfg.item_dim + cfg.category_dim + cfg.brand_dim + cfg.shop_dim
        self.project = nn.ModuleDict()
        if "ids" in self.modalities:
            self.project["ids"] = nn.Linear(id_width, d)
        if "image" in self.modalities:
            self.project["image"] = nn.Linear(features.image.shape[1], d)
        if "title" in self.modalities:
            words = shared_tensor(features.word_vectors)
            self.title_cnn = TitleCNN(words, cfg.title_windows, cfg.title_filters)
            self.project["title"] = nn.Linear(self.title_cnn.out_dim, d)
        if "stats" in self.modalities:
            n_stats = max(statistics.n_stats, 1)
            self.stat_table = nn.Embedding(n_stats * per_stat, cfg.stats_dim)
            self.project["stats"] = nn.Linear(n_stats * len(statistics.buckets) * cfg.stats_dim, d)
        self.dim = d

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    def raw(self, states: ItemStates, modality: str) -> torch.Tensor:
        """U item states -> (U, D_m) the modality's embedding before projection."""
        items = states.items
        if modality == "ids":
            own = torch.where(
                items < self.id_tables[0].num_embeddings, items, 0
            )  # rows added by extend(): PAD
            codes = torch.cat([own[:, None], self.attributes[items]], dim=1)  # (U, 4) item cat brand shop
            return torch.cat([table(codes[:, j]) for j, table in enumerate(self.id_tables)], dim=1)
        if modality == "image":
            return self.image[items]
        if modality == "title":
            return self.title_cnn(self.title[items])
        if modality == "stats":
            if self.stat_offsets.shape[0] == 0:  # a dataset without statistics: one all-zero slot
                return torch.zeros(len(items), self.project["stats"].in_features, device=items.device)
            codes = states.stats.long() + self.stat_offsets  # (U, F, G)
            return self.stat_table(codes).flatten(1)  # (U, F * G * stats_dim)
        raise ValueError(f"unknown modality {modality!r}")

    def extend(self, attributes: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Add items the model never saw (serving cold start) from the features that are known for them.

        attributes (K, 3) category, brand and shop codes (PAD when unknown), image (K, D_img) vectors
        (zeros when unknown); their title stays missing and their own ID embedding is PAD's (statistics
        are not the item's but its state's: they come with each request). Returns the K new codes, usable
        wherever item codes are.
        """
        if attributes.shape != (len(image), 3) or image.shape[1:] != self.image.shape[1:]:
            raise ValueError(
                f"extend needs attributes (K, 3) and image (K, {self.image.shape[1]}), "
                f"got {tuple(attributes.shape)} and {tuple(image.shape)}"
            )
        start, k = self.attributes.shape[0], len(image)
        self.attributes = torch.cat([self.attributes, attributes.to(self.attributes)])
        self.image = torch.cat([self.image, image.to(self.image)])
        self.title = torch.cat([self.title, self.title.new_zeros((k, *self.title.shape[1:]))])
        return torch.arange(start, start + k, device=self.attributes.device)

    def overwrite(self, codes: torch.Tensor, attributes: torch.Tensor, image: torch.Tensor) -> None:
        """Give rows added by :meth:`extend` to other cold items (a serving replica's bounded cold slots):
        codes (K,), attributes (K, 3), image (K, D_img). A trained item's row is never written."""
        trained = self.id_tables[0].num_embeddings
        if len(codes) and int(codes.min()) < trained:
            raise ValueError(f"overwrite may reuse only rows added by extend (codes >= {trained})")
        if attributes.shape != (len(codes), 3) or image.shape != (len(codes), *self.image.shape[1:]):
            raise ValueError(
                f"overwrite needs attributes ({len(codes)}, 3) and image ({len(codes)}, "
                f"{self.image.shape[1]}), got {tuple(attributes.shape)} and {tuple(image.shape)}"
            )
        self.attributes[codes] = attributes.to(self.attributes)
        self.image[codes] = image.to(self.image)
        self.title[codes] = 0

    def forward(self, states: ItemStates, modalities: Sequence[str] | None = None) -> torch.Tensor:
        """U item states -> (U, M, D) projected modality embeddings e^m (of ``modalities`` only, in their
        order, when given)."""
        chosen = self.modalities if modalities is None else modalities
        # A batch holds many states of few items (the same item on many days): the item's own modalities
        # (IDs, image, title CNN) run once per distinct item, only the statistics once per state.
        items, inverse = torch.unique(states.items, return_inverse=True)
        per_item = ItemStates(items, states.stats[:0])
        return torch.stack(
            [
                self.project[m](self.raw(states, m))
                if m == "stats"
                else take_rows(self.project[m](self.raw(per_item, m)), inverse)
                for m in chosen
            ],
            dim=1,
        )

    def groups(self, states: ItemStates) -> list[ModalityGroup]:
        """U item states -> their modality embeddings split by what they depend on: the item's own
        modalities (IDs, image, title) once per distinct item, the statistics (always last) once per state.

        A fusion whose first layers are per modality runs them on each group and meets the groups only where
        modalities mix (:meth:`ModalityGroup.stack`, :func:`sum_over_groups`): exact, and a batch holds many
        states of few items (about 4 per item at batch 1024 on MovieLens)."""
        own = [m for m in self.modalities if m != "stats"]
        out = []
        if own:
            items, inverse = torch.unique(states.items, return_inverse=True)
            e = self(ItemStates(items, states.stats[:0]), own)  # (U_i, K, D)
            out.append(ModalityGroup(e, slice(0, len(own)), inverse))
        if "stats" in self.modalities:
            out.append(ModalityGroup(self(states, ["stats"]), slice(len(own), len(own) + 1), None))
        return out


def grouping_pays(states: ItemStates) -> bool:
    """Whether :meth:`ItemModalities.groups` saves work on ``states``: when items recur (a training batch
    holds about 4 states per item); a request's candidates are mostly distinct items, where the split only
    adds gathers (batch-1 scoring of 100 candidates was ~5% slower through it)."""
    return 2 * len(torch.unique(states.items)) <= len(states.items)


@dataclass(frozen=True)
class ModalityGroup:
    """Embeddings e (N, K, D) of the modalities ``slots`` of a model's M, one row per distinct item
    (``rows``: each of the U states' row) or, with ``rows`` None, one per state (N = U)."""

    e: torch.Tensor
    slots: slice
    rows: torch.Tensor | None

    def to_states(self, value: torch.Tensor) -> torch.Tensor:
        """(N, ...) computed on this group's rows -> (U, ...) one per state."""
        return value if self.rows is None else take_rows(value, self.rows)


def stack_groups(groups: Sequence[ModalityGroup], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-group (N_g, K_g, ...) values -> (U, M, ...), the modalities back in their order."""
    parts = [g.to_states(v) for g, v in zip(groups, values, strict=True)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def sum_over_groups(groups: Sequence[ModalityGroup], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-group (N_g, ...) partial sums (of a linear map over modalities) -> (U, ...) their total."""
    parts = [g.to_states(v) for g, v in zip(groups, values, strict=True)]
    return parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])


class BehaviorProperty(nn.Module):
    """Paper 3.1.2: behaviour type and time-gap bucket -> p_t, (B, L) x 2 -> (B, L, P)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = nn.Embedding(len(BEHAVIORS) + 1, cfg.behavior_dim, padding_idx=0)
        self.gap = nn.Embedding(GAP_BUCKETS, cfg.behavior_dim, padding_idx=0)
        self.dim = 2 * cfg.behavior_dim

    def forward(self, behavior: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.kind(behavior), self.gap(gap)], dim=-1)


HISTORY = ("hist_items", "hist_stats", "hist_behavior", "hist_gap")


def recent_window(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with history columns past its longest history dropped (they are padding in every row).

    The recurrent loop is the one cost that grows with L, and most batches are shorter than max_history.
    Raises ValueError for lengths outside [0, L].
    """
    lengths, width = batch["hist_len"], batch["hist_items"].shape[1]
    shortest, longest = (int(v) for v in torch.aminmax(lengths))
    if shortest < 0 or longest > width:
        raise ValueError(f"hist_len must lie in [0, {width}], got values in [{shortest}, {longest}]")
    steps = max(longest, 1)  # one all-padding step keeps shapes non-empty for all-empty batches
    return {name: t[:, :steps] if name in HISTORY else t for name, t in batch.items()}


def batch_items(batch: dict[str, torch.Tensor]) -> tuple[ItemStates, torch.Tensor]:
    """The distinct item states of a batch and where each position finds its state.

    Returns ``unique`` (U states) and ``inverse`` (B, 1 + L): column 0 the candidate, then the history.
    Item encoders run once per distinct state (histories repeat items a lot), then results are gathered.
    """
    return distinct_states(
        torch.cat([batch["item"][:, None], batch["hist_items"]], dim=1),  # (B, 1 + L)
        torch.cat([batch["item_stats"][:, None], batch["hist_stats"]], dim=1),  # (B, 1 + L, F, G)
    )


def distinct_states(items: torch.Tensor, stats: torch.Tensor) -> tuple[ItemStates, torch.Tensor]:
    """Item codes (...,) with their stat codes (..., F, G) -> the distinct states and (...,) inverse.

    Exact, with 1-D sorts only (``torch.unique(dim=0)`` costs a few tensor ops per row on CPU): the codes
    are packed into 63-bit columns, each column ranked, and the ranks folded column by column.
    """
    shape, (f, g) = items.shape, stats.shape[-2:]
    flat_items, flat_stats = items.reshape(-1), stats.reshape(-1, f, g)
    codes = flat_stats.reshape(len(flat_items), f * g).long()  # (N, FG), each >= 0
    columns = [flat_items]
    if codes.shape[1]:
        bits = max(int(codes.max()).bit_length(), 1)
        per_column = 63 // bits
        for start in range(0, codes.shape[1], per_column):
            chunk = codes[:, start : start + per_column]
            shifts = torch.arange(chunk.shape[1], device=codes.device) * bits
            columns.append((chunk << shifts).sum(dim=1))  # (N,) exact: the codes do not overlap
    key = torch.zeros_like(flat_items)
    for column in columns:
        values, rank = torch.unique(column, return_inverse=True)
        _, key = torch.unique(key * len(values) + rank, return_inverse=True)  # ranks stay below N
    n_states = int(key.max()) + 1 if len(key) else 0
    positions = torch.arange(len(key), device=key.device)
    first = torch.full((n_states,), len(key), device=key.device).scatter_reduce_(0, key, positions, "amin")
    return ItemStates(flat_items[first], flat_stats[first]), key.reshape(shape)


def take_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (U, ...) and an integer index (...) -> table[index]; via ``index_select``, whose backward (an
    index_add) is about twice as fast on CPU as advanced indexing's (an accumulating index_put)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def gather_items(per_item: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, ...) per distinct item -> candidate (B, ...) and history (B, L, ...)."""
    rows = take_rows(per_item, inverse)  # (B, 1 + L, ...)
    return rows[:, 0], rows[:, 1:]


def distinct_histories(
    batch: dict[str, torch.Tensor], inverse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's distinct history inputs, from :func:`batch_items`' ``inverse`` (B, 1 + L).

    Returns ``rows`` (K,), one sample per distinct history, and ``which`` (B,), the history each sample reads.
    Two samples share a history input when every real position holds the same item state, behaviour and
    time gap (padding is ignored: no model reads it): a target's positive and its sampled negative
    (training keeps them in one batch), or the candidates of one request. Exact: the sequence encoder's
    states then run once per distinct history.
    """
    per_position = (inverse[:, 1:] * (len(BEHAVIORS) + 1) + batch["hist_behavior"]) * GAP_BUCKETS + batch[
        "hist_gap"
    ]  # (B, L): one code per (state, behaviour, gap)
    per_position = per_position.masked_fill(~sequence_mask(batch["hist_len"], per_position.shape[1]), -1)
    key = torch.cat([batch["hist_len"][:, None], per_position], dim=1)  # (B, 1 + L)
    _, which = torch.unique(key, dim=0, return_inverse=True)  # (B,)
    positions = torch.arange(len(which), device=which.device)
    k = int(which.max()) + 1 if len(which) else 0
    rows = torch.full((k,), len(which), device=which.device).scatter_reduce_(0, which, positions, "amin")
    return rows, which


def by_length(
    hist_len: torch.Tensor,
    which: torch.Tensor,
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
    floor: int = 8,
    min_rows: int = 16,
) -> torch.Tensor:
    """Run a sequence encoder per length bucket of K distinct histories and put the B samples' outputs
    back in batch order.

    ``hist_len`` (K,) the histories' lengths, ``which`` (B,) the history of each sample. Histories fall in
    power-of-two length ranges ((0, floor], (floor, 2 floor], ...; a range with fewer than ``min_rows``
    histories joins the next longer one), and ``run(rows, samples, which, steps)`` gets one range: its
    histories ``rows`` (K_b,), the samples that read them ``samples`` (B_b,), each sample's history as a
    position in ``rows`` (B_b,), and the range's longest history ``steps`` (>= 1). It returns (B_b, ...).
    Fewer than ``2 * min_rows`` histories (a served request, a small batch) run as one call, in batch order.

    Exact for an encoder over left-aligned histories that ignores padding (the RNNs here, masked
    attention): a bucket only drops all-padding columns. It pays because a padded RNN costs every column
    of every row: with lengths spread over 1..50, one call runs about 3 times the real steps, buckets
    about 1.4 times.
    """
    if len(hist_len) < 2 * min_rows:  # one bucket (serving a request, a small batch): no reordering
        steps = max(int(hist_len.max()), 1) if len(hist_len) else 1
        rows, samples = (torch.arange(len(t), device=t.device) for t in (hist_len, which))
        return run(rows, samples, which, steps)
    ranges = torch.ceil(torch.log2(hist_len.clamp(min=1).double() / floor)).clamp(min=0).long()  # (K,)
    bucket_of = torch.empty_like(ranges)
    groups: list[torch.Tensor] = []
    pending = ranges.new_empty(0)
    present = torch.unique(ranges).tolist()  # ascending
    for r in present:
        pending = torch.cat([pending, (ranges == r).nonzero().squeeze(1)])
        if len(pending) >= min_rows or r == present[-1]:
            bucket_of[pending] = len(groups)
            groups.append(pending)
            pending = pending[:0]
    position = torch.empty_like(ranges)  # (K,) each history's place in its bucket
    outputs, order = [], []
    sample_bucket = bucket_of[which]  # (B,)
    for b, rows in enumerate(groups):
        samples = (sample_bucket == b).nonzero().squeeze(1)  # (B_b,)
        position[rows] = torch.arange(len(rows), device=rows.device)
        steps = max(int(hist_len[rows].max()), 1)
        outputs.append(run(rows, samples, position[which[samples]], steps))
        order.append(samples)
    restore = torch.empty_like(which)
    restore[torch.cat(order)] = torch.arange(len(which), device=which.device)
    return take_rows(torch.cat(outputs), restore)  # (B, ...)


@dataclass(frozen=True)
class HistoryBucket:
    """One length bucket of a batch's distinct histories (see :func:`encode_histories`)."""

    reps: torch.Tensor  # (K_b, L_b, D) the histories' item vectors, L_b = their longest
    rows: torch.Tensor  # (K_b,) a batch row holding each history
    lengths: torch.Tensor  # (K_b,)
    candidate: torch.Tensor  # (B_b, D) the vectors of the candidates that read these histories
    which: torch.Tensor  # (B_b,) each candidate's history, a position in ``rows``
    batch: dict[str, torch.Tensor]

    @property
    def mask(self) -> torch.Tensor:
        return sequence_mask(self.lengths, self.reps.shape[1])  # (K_b, L_b)

    def column(self, name: str) -> torch.Tensor:
        """A history column of the batch (``hist_behavior``, ``hist_gap``, ...) for these histories."""
        return self.batch[name][self.rows, : self.reps.shape[1]]  # (K_b, L_b, ...)


def encode_histories(
    batch: dict[str, torch.Tensor],
    inverse: torch.Tensor,
    vectors: torch.Tensor,
    encode: Callable[[HistoryBucket], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence part of a model, once per distinct history and per length bucket.

    ``batch`` (its recent window), ``inverse`` (B, 1 + L) from :func:`batch_items`, ``vectors`` (U, D) one
    per distinct state, and ``encode``, the model's sequence encoder on one :class:`HistoryBucket` ->
    (B_b, ...). Returns the candidates' vectors (B, D) and ``encode``'s outputs in batch order (B, ...).
    """
    candidate = take_rows(vectors, inverse[:, 0])  # (B, D)
    histories, which = distinct_histories(batch, inverse)  # (K,), (B,): a positive and its negative share one
    hist_len = batch["hist_len"][histories]  # (K,)

    def run(rows: torch.Tensor, samples: torch.Tensor, own: torch.Tensor, steps: int) -> torch.Tensor:
        at = histories[rows]  # (K_b,)
        reps = take_rows(vectors, inverse[at, 1 : steps + 1])  # (K_b, L_b, D)
        return encode(HistoryBucket(reps, at, hist_len[rows], take_rows(candidate, samples), own, batch))

    return candidate, by_length(hist_len, which, run)
