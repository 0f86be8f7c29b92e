"""DIN: Deep Interest Network (Zhou, Zhu, Song, Fan, Zhu, Ma, Yan, Jin, Li & Gai, KDD 2018).

    items --ItemModalities--> e^m (U, M, D) --flatten--> item vector (U, M*D)
    k_t = item_t (+ W_p p_t)                              (B, L, M*D)  history keys
    a_t = MLP([k_t, v_X, k_t - v_X, k_t * v_X])           (B, L)       local activation unit, raw weights
    v_U = sum_t a_t k_t                                   (B, M*D)     weighted sum pooling, Eq. 3
    logit = MLP_dice(BN([v_U, v_X]))                      (B,)         Dice activations, Eq. 9

Notation: B batch, L history length, U distinct items in the batch, M modalities, D = modality_dim,
P behaviour-property width.

As in DIN, the activation weights are not normalised by a softmax (Eq. 3 relaxes sum_t a_t = 1 to keep
the intensity of user interests), padded positions get weight 0, and the pooled interest and the candidate are
concatenated for the prediction MLP. Items are encoded once per distinct item of the batch and the
attention runs over all positions at once (no loop over L): DIN is the speed reference of the benchmarks.

Where we depart and why:
- Item vectors are the MARN paper's modalities from ItemModalities (IDs, image, title and statistics by
  default), concatenated: the paper feeds every neural baseline MARN's features. ``modalities``
  selects a subset; ``("ids",)`` gives DIN's own goods features (item, category, brand, shop).
- ``behavior=True`` adds a linear map of the behaviour property (type and time gap, paper 3.1.2) to each
  history key, the one place DIN can take a per-behaviour feature; ``behavior=False`` is DIN as published.
- The activation unit is the shared CandidateAttention: the input [k, q, k - q, k * q] of the authors'
  code (the paper draws an outer product), ReLU hidden layers of ``cfg.attention_hidden`` (80, 40 as
  DIN's code, which uses sigmoid there).
- The prediction MLP is the MARN paper's fixed ``cfg.hidden`` (DIN: 200-80); its activation is Dice by
  default, or PReLU / ReLU. DIN has no user-profile or context fields here: the dataset has none.
- The MLP's input is batch-normalised, as in the authors' code (``b1`` before the first dense layer).
  Raw attention sums grow with the weights: without it, AdaGrad at lr 0.1 from the registry's Glorot init
  drove first-epoch losses to ~1e4 and left dead units. Per-unit statistics over the batch keep the
  differences in interest intensity between users, which a per-row norm would erase.
- Dice (Eq. 9) is implemented from the formula, p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)), with
  per-unit mini-batch statistics in training and running averages of them in eval, as the paper says;
  no BatchNorm scale or shift (DeepCTR adds one; the authors' later code adds a learnt scale beta).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import (
    MODALITIES,
    BehaviorProperty,
    CandidateAttention,
    ItemModalities,
    batch_items,
    distinct_histories,
    sequence_mask,
    take_rows,
)

ACTIVATIONS = ("dice", "prelu", "relu")


class Dice(nn.Module):
    """DIN's Eq. 9: f(s) = p(s) s + (1 - p(s)) alpha s, p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps)).

    E[s] and Var[s] are per unit: over the mini-batch in training, running averages of those in eval.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-8,  # the paper's epsilon
        momentum: float = 0.1,  # running-average rate for eval statistics; PyTorch BatchNorm's default
    ):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))  # 0 at start, as the authors' code
        self.register_buffer("running_mean", torch.zeros(dim))  # saved with the model: eval needs them
        self.register_buffer("running_var", torch.ones(dim))
        self.eps, self.momentum = eps, momentum

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D)."""
        if self.training:
            mean = s.mean(dim=0)  # (D,); gradients flow through the batch statistics, as in BatchNorm
            var = (s - mean).pow(2).mean(dim=0)  # (D,) biased; Tensor.var over dim 0 is ~15x slower on CPU
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((s - mean) / torch.sqrt(var + self.eps))
        return p * s + (1.0 - p) * self.alpha * s


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d that also takes a one-row training batch (an epoch's last) by using running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


class PredictionMLP(nn.Sequential):
    """Linear -> activation (-> Dropout) per hidden width, then a linear output to one logit."""

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str, dropout: float = 0.0):
        layers: list[nn.Module] = []
        for width in hidden:
            layers.append(nn.Linear(in_dim, width))
            if activation == "dice":
                layers.append(Dice(width))
            elif activation == "prelu":
                layers.append(nn.PReLU(width, init=0.0))  # slope 0 at start, as DIN's code
            else:
                layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        super().__init__(*layers)


class DIN(CTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        modalities: Sequence[str] = MODALITIES,
        activation: Literal["dice", "prelu", "relu"] = "dice",  # the prediction MLP's; Dice is the paper's
        behavior: bool = True,  # property added to the keys (fairness rule); False: DIN as published
    ):
        super().__init__(catalog, features, cfg)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.embedding = ItemModalities(catalog, features, cfg, modalities)
        dim = self.embedding.n_modalities * self.embedding.dim  # M*D
        self.use_behavior = behavior
        if behavior:
            self.behavior = BehaviorProperty(cfg)
            self.property = nn.Linear(self.behavior.dim, dim, bias=False)  # W_p: property into item space
        self.attention = CandidateAttention(dim, cfg.attention_hidden, normalize=False)  # local activation
        self.input_norm = BatchNorm(2 * dim)  # the authors' code's b1
        self.predict = PredictionMLP(2 * dim, cfg.hidden, activation, dropout=cfg.dropout)

    def _inputs(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidate vectors (B, M*D); history keys (K, L, M*D) and their real-behaviour mask (K, L) of the
        K distinct histories (a positive and its negative share one); ``which`` (B,) each sample's."""
        unique, inverse = batch_items(batch)
        vectors = self.embedding(unique).flatten(1)  # (U, M, D) -> (U, M*D), each distinct item once
        candidate = take_rows(vectors, inverse[:, 0])  # (B, M*D)
        rows, which = distinct_histories(batch, inverse)  # (K,), (B,)
        keys = take_rows(vectors, inverse[rows, 1:])  # (K, L, M*D)
        if self.use_behavior:
            keys = keys + self.property(self.behavior(batch["hist_behavior"][rows], batch["hist_gap"][rows]))
        return candidate, keys, sequence_mask(batch["hist_len"][rows], keys.shape[1]), which

    def attention_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L) the activation unit's raw weights a_t; 0 on padded positions."""
        candidate, keys, mask, which = self._inputs(batch)
        return self.attention.weights(keys, candidate, mask, which)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        candidate, keys, mask, which = self._inputs(batch)
        interest = self.attention(keys, candidate, mask, which)  # (B, M*D) sum_t a_t k_t, no softmax
        logits = self.predict(self.input_norm(torch.cat([interest, candidate], dim=1))).squeeze(-1)  # (B,)
        return ModelOutput(logits=logits)
