"""DIEN: Deep Interest Evolution Network (Zhou, Mou, Fan, Pi, Bian, Zhou, Zhu, Gai; AAAI 2019).

The network, top to bottom:

    items --ItemModalities--> e^m, concatenated: item vector e        (U, E)
    x_t = [e_t, p_t], p_t = BehaviorProperty (our addition, below)    (B, L, E + P)
    interest extractor: GRU over x_t -> h_t                           (B, L, H)   DIEN: interest extractor
    L_aux = -log s([h_t, e_{t+1}]) - log(1 - s([h_t, e^-_{t+1}]))     scalar      DIEN: auxiliary loss
            s = sigmoid(aux MLP), e^- a random catalogue item, averaged over real (t, t + 1) pairs
    a_t = masked softmax_t DIN-MLP(h_t, PReLU(W q)), q = candidate e  (B, L)      DIEN: attention
    interest evolving: AUGRU, u'_t = a_t u_t; its state at the last   (B, H)      DIEN: AUGRU
            real step is the evolved interest h'_T
    logit = MLP([h'_T, q, sum_t e_t, q * sum_t e_t])                   (B,)
    loss = L_ctr + alpha L_aux (training only)

Notation: B batch, L history, U distinct items in the batch, M modalities, D = modality_dim, E = M * D,
P behaviour-property width, H = sequence_dim.

Where we depart from the paper, and why:
- Behaviour property. DIEN's behaviours have no property; the MARN paper feeds every model that can take
  it the behaviour type and time gap, and the natural place is the extractor GRU's input. The auxiliary
  net still predicts the next item vector alone: it is the next behaviour's item that is clicked.
- Auxiliary net. The paper writes s(h_t, e) as an inner product; we follow the authors' code (the
  ``alpha`` = 1 setting also comes from it): an MLP on [h_t, e_{t+1}] with sigmoid hidden layers (100, 50),
  no batch norm, one logit with binary cross-entropy instead of its equivalent two-way softmax. One
  negative per step, uniform over catalogue codes 1..n_items-1 from torch's global RNG; it may coincide
  with the positive (chance 1 / (n_items - 1)). The loss is averaged over the real (t, t + 1) pairs; the
  code averages over all B (L - 1) slots, padding included, which ties the scale to the padding length.
- Attention. The paper's form is bilinear, a_t ∝ exp(h_t W q); the authors' code, followed here, projects
  the candidate to H (dense + PReLU) and scores it with DIN's MLP over [h_t, q, h_t - q, h_t * q]
  (:class:`CandidateAttention`, ReLU hidden layers ``cfg.attention_hidden`` where the code has sigmoid),
  softmax over the real behaviours.
- GRU form. The reset gate scales U_h h_{t-1} after the product (cuDNN's form, as ``nn.GRU`` in the
  extractor), where TensorFlow's GRUCell in the authors' code applies it to h_{t-1} before.
- Features and sizes. Items are MARN's modalities concatenated (IDs: item, category, brand, shop; image;
  title CNN; statistics) in place of DIEN's item and category IDs; the prediction MLP is ``cfg.hidden`` with
  ReLU (MARN paper 4.1) and the GRU width ``cfg.sequence_dim``. The final input follows the authors' code
  (evolved interest, candidate, history sum, candidate * history sum) without the user-ID embedding: the
  DIN protocol's samples carry no user features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import (
    MLP,
    MODALITIES,
    BehaviorProperty,
    CandidateAttention,
    ItemModalities,
    batch_items,
    distinct_histories,
    distinct_states,
    recent_window,
    run_gru,
    sequence_mask,
    take_rows,
)


class AUGRU(nn.Module):
    """GRU with an attentional update gate (DIEN): u'_t = a_t u_t, h_t = (1 - u'_t) h_{t-1} + u'_t h~_t.

    ``(B, L, D_in), (B, L) -> (B, H)``, the state after the last step, from a zero state. A step with
    a_t = 0 leaves the state exactly as it was, so with attention 0 on padding the result is the state at
    each row's last real behaviour (and 0 for an empty history).
    """

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.input = nn.Linear(input_dim, 3 * hidden)  # W^r, W^u, W^h with b, rows in that order
        self.recurrent = nn.Linear(hidden, 3 * hidden, bias=False)  # U^r, U^u, U^h
        self.hidden = hidden

    def forward(self, inputs: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        h_dim = self.hidden
        x = self.input(inputs.transpose(0, 1))  # (L, B, 3H) for every step at once, time-major
        # Gate and candidate parts split once, not sliced per step: a slice's backward fills a zero tensor
        # of the whole step, twice per step and operand; unbinding the split parts backs into one stack.
        x_gates, x_new = x.split([2 * h_dim, h_dim], dim=-1)  # (L, B, 2H), (L, B, H)
        w_gates, w_new = (w.t() for w in self.recurrent.weight.split([2 * h_dim, h_dim]))  # (H, 2H), (H, H)
        scale = attention.t()[..., None]  # (L, B, 1)
        h = x.new_zeros(x.shape[1], h_dim)  # (B, H)
        for g_t, n_t, a_t in zip(x_gates, x_new, scale, strict=True):
            r, u = torch.sigmoid(torch.addmm(g_t, h, w_gates)).chunk(2, dim=1)  # each (B, H)
            candidate = torch.tanh(n_t + r * (h @ w_new))
            h = torch.lerp(h, candidate, a_t * u)  # (1 - u') h + u' h~ with u' = a_t u
        return h


def _auxiliary_net(in_dim: int, hidden: Sequence[int]) -> nn.Sequential:
    """The authors' auxiliary_net: dense layers with sigmoid activations, then one click logit."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.Sigmoid()]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, 1))


class DIEN(CTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        alpha: float = 1.0,  # weight of L_aux; 1 in the authors' code (the paper leaves it a hyperparameter)
        aux_hidden: tuple[int, ...] = (100, 50),  # auxiliary net widths, the authors' code
    ):
        super().__init__(catalog, features, cfg)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.n_items = len(catalog.items)  # codes 0 (PAD) .. n_items - 1
        if self.n_items < 2:
            raise ValueError(
                "DIEN's auxiliary loss needs at least one catalogue item to sample negatives from"
            )
        self.alpha = alpha
        self.embedding = ItemModalities(catalog, features, cfg, MODALITIES)
        item_dim = self.embedding.n_modalities * self.embedding.dim  # E
        h_dim = cfg.sequence_dim
        self.behavior = BehaviorProperty(cfg)
        self.extractor = nn.GRU(item_dim + self.behavior.dim, h_dim, batch_first=True)  # interest extractor
        self.aux_net = _auxiliary_net(h_dim + item_dim, aux_hidden)
        self.query = nn.Sequential(nn.Linear(item_dim, h_dim), nn.PReLU(h_dim))  # candidate -> H
        self.attention = CandidateAttention(h_dim, cfg.attention_hidden, normalize=True)
        self.evolution = AUGRU(h_dim, h_dim)  # interest evolving layer
        self.predict = MLP(h_dim + 3 * item_dim, cfg.hidden, out_dim=1, dropout=cfg.dropout)

    def sample_negatives(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Item codes drawn uniformly from 1..n_items-1 with torch's global RNG."""
        return torch.randint(1, self.n_items, shape, device=device)

    def item_vectors(
        self, batch: dict[str, torch.Tensor], rows: torch.Tensor, negatives: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Candidate (B, E), the distinct histories at ``rows`` (K, L, E) and their negatives' (K, L - 1, E)
        item vectors, each distinct item state encoded once.

        A sampled negative stands against the next clicked item and takes that item's statistics: the
        batch holds no point-in-time statistics of arbitrary items, and equal statistics keep the auxiliary
        task from being solved by popularity alone."""
        hist_items, hist_stats = batch["hist_items"][rows], batch["hist_stats"][rows]  # (K, L), (K, L, F, G)
        k, width = hist_items.shape
        items, stats = [batch["item"], hist_items.flatten()], [batch["item_stats"], hist_stats.flatten(0, 1)]
        if negatives is not None:
            items.append(negatives.flatten())
            stats.append(hist_stats[:, 1:].flatten(0, 1))  # (K (L - 1), F, G)
        unique, inverse = distinct_states(torch.cat(items), torch.cat(stats))
        table = self.embedding(unique).flatten(1)  # (U, E), each distinct state once
        # each part gathered from the table on its own: slices of one gathered (B + K L + ...) tensor would
        # each back-propagate a zero tensor of that whole size, then add them up
        b = len(batch["item"])
        candidate = take_rows(table, inverse[:b])  # (B, E)
        history = take_rows(table, inverse[b : b + k * width].view(k, width))  # (K, L, E)
        negative = (
            take_rows(table, inverse[b + k * width :].view(k, width - 1)) if negatives is not None else None
        )  # (K, L - 1, E)
        return candidate, history, negative

    def auxiliary_loss(
        self,
        states: torch.Tensor,
        history: torch.Tensor,
        negative: torch.Tensor,
        mask: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h_t (K, L, H) against the next behaviour's item (K, L, E) and a negative (K, L - 1, E); ``counts``
        (K,) how many of the batch's samples read each history (None: one each), so the mean is over the
        samples' real next behaviours, as if every sample ran its own history."""
        h = states[:, :-1]  # (K, L - 1, H), the interest after behaviour t
        clicked = self.aux_net(torch.cat([h, history[:, 1:]], dim=-1)).squeeze(-1)  # (K, L - 1)
        sampled = self.aux_net(torch.cat([h, negative], dim=-1)).squeeze(-1)  # (K, L - 1)
        loss = F.softplus(-clicked) + F.softplus(sampled)  # -log s(clicked) - log(1 - s(sampled))
        real = mask[:, 1:].float()  # pairs whose next behaviour is real
        if counts is not None:
            real = real * counts[:, None]
        return (loss * real).sum() / real.sum().clamp(min=1.0)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        batch = recent_window(batch)
        width = batch["hist_items"].shape[1]
        # (K,), (B,): the distinct histories (a positive and its negative share one) and each sample's
        rows, which = distinct_histories(batch, batch_items(batch)[1])
        lengths = batch["hist_len"][rows]  # (K,)
        negatives = None
        if self.training:  # one negative per next behaviour of each distinct history
            negatives = self.sample_negatives((len(rows), width - 1), lengths.device)
        candidate, history, negative = self.item_vectors(batch, rows, negatives)  # (B, E), (K, L, E), ...
        mask = sequence_mask(lengths, width)  # (K, L)
        props = self.behavior(batch["hist_behavior"][rows], batch["hist_gap"][rows])  # (K, L, P)
        states = run_gru(self.extractor, torch.cat([history, props], dim=-1), lengths)  # (K, L, H), 0 on pad
        weights = self.attention.weights(states, self.query(candidate), mask, which)  # (B, L), 0 on padding
        interest = self.evolution(take_rows(states, which), weights)  # (B, H)
        # padding rows are not zero vectors: mask them out of the pooled history
        pooled = take_rows((history * mask[..., None].float()).sum(1), which)  # (B, E)
        features = torch.cat([interest, candidate, pooled, candidate * pooled], dim=1)
        logits = self.predict(features).squeeze(-1)  # (B,)
        if negative is None:
            return ModelOutput(logits)
        counts = torch.bincount(which, minlength=len(rows)).to(states.dtype)  # (K,) samples per history
        aux = self.auxiliary_loss(states, history, negative, mask, counts)
        return ModelOutput(logits, aux_loss=self.alpha * aux, aux={"dien_aux": aux.detach()})
