"""NAML: Neural News Recommendation with Attentive Multi-View Learning (Wu, Wu, An, Huang, Huang, Xie;
IJCAI 2019), paper Table 2 group 3.

    items --ItemModalities--> e^m                        (U, M, D_e)    the views (paper 4.2: same inputs)
    r^m = ReLU(V_m e^m + v_m)                            (U, M, D)      one view encoder per view
    a^m = q^T tanh(U r^m + u),  alpha = softmax_m(a)     (U, M)         view-level attention
    rep = sum_m alpha^m r^m                              (U, D)
    user model: GRUAttentionUser (default) or NAML's, see below; logit = MLP([u, rep_X])

Notation: B batch, L history, U distinct items in the batch, M modalities (NAML's views), D = rep_dim.

NAML's news encoder learns one vector per view (title, body, category, subcategory) and pools them with
additive attention; that is what the MARN paper credits it for ("applies attention mechanism to news
encoder to select important views"). Our views are the item's four modalities.

Where we depart, and why:
- Views. NAML's title and body views run a CNN over word vectors and pool its outputs with word-level
  additive attention; our title view is the Kim CNN of :class:`ItemModalities`, max-pooled over time, so
  there is no word-level attention (the fairness rule: every neural model gets MARN's title encoder).
  There is no body view; image, IDs and statistics are views in its place. Every view gets NAML's
  category-view encoder, a dense ReLU layer, so all views are ``rep_dim`` wide, as MARN's item rep.
- User model. NAML's user encoder is additive attention over the clicked news (independent of the
  candidate) and its click score a dot product. By default we use instead the user model all of group 3
  shares (:class:`marn.models.dmf.GRUAttentionUser`): the MARN paper groups NAML with DMF and MMSS as
  *fusion* methods and discusses only its news encoder; DMF and MMSS have no user model of their own, so a
  shared one is the only way to compare the three fusions on equal terms; and the paper fixes the
  prediction MLP for all models, which replaces NAML's dot product in any case. ``user_encoder="naml"``
  keeps NAML's own user encoder (additive attention over the history, query size 200 as NAML) under the
  same prediction MLP, for a check of how much the choice matters.
- NAML trains with negative sampling as a (K + 1)-way classification; here it is pointwise CTR with
  log loss, like every model of the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.dmf import FusionCTRModel, GRUAttentionUser
from marn.models.layers import (
    MLP,
    MODALITIES,
    ItemStates,
    ModalityGroup,
    grouping_pays,
    masked_softmax,
    sequence_mask,
    stack_groups,
    take_rows,
)
from marn.models.marn import PerModalityLinear

NAML_QUERY_DIM = 200  # NAML's attention query size (views, words and clicked news alike)


class AdditiveAttention(nn.Module):
    """NAML's attention pooling: a_i = q^T tanh(U x_i + u), alpha = softmax_i(a); gives sum_i alpha_i x_i."""

    def __init__(self, dim: int, query_dim: int):
        super().__init__()
        self.project = nn.Linear(dim, query_dim)  # U, u
        self.query = nn.Linear(query_dim, 1, bias=False)  # q

    def scores(self, values: torch.Tensor) -> torch.Tensor:
        """(N, K, D) -> (N, K) a_i, each of one value alone."""
        return self.query(torch.tanh(self.project(values))).squeeze(-1)

    def weights(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K, D) values, optional (N, K) mask -> (N, K) weights, a distribution over K (zeros if none)."""
        scores = self.scores(values)  # (N, K)
        if mask is None:
            return torch.softmax(scores, dim=-1)
        return masked_softmax(scores, mask)

    def forward(
        self, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.weights(values, mask)  # (N, K)
        return torch.einsum("nk,nkd->nd", weights, values), weights  # (N, D), (N, K)

    def over_groups(
        self, groups: Sequence[ModalityGroup], values: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` over the modalities of ``groups`` (``values`` (N_g, K_g, D) each): the scores once
        per group row, the softmax and the weighted sum once per state -> (U, D), (U, M)."""
        weights = torch.softmax(stack_groups(groups, [self.scores(v) for v in values]), dim=-1)  # (U, M)
        return torch.einsum("nk,nkd->nd", weights, stack_groups(groups, values)), weights


class AttentiveMultiView(nn.Module):
    """NAML's news encoder on our views: a dense ReLU layer per view, then view-level attention."""

    def __init__(self, modalities: int, in_dim: int, dim: int, query_dim: int):
        super().__init__()
        self.views = PerModalityLinear(modalities, in_dim, dim)
        self.attention = AdditiveAttention(dim, query_dim)

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, M, D_e) -> item rep (U, D) and view weights alpha (U, M)."""
        views = torch.relu(self.views(e))  # (U, M, D) r^m
        return self.attention(views)

    def over_groups(self, groups: Sequence[ModalityGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` on modality groups (``ItemModalities.groups``): the item's own views once per
        distinct item (equal to ``forward`` on the stacked embeddings, tested)."""
        views = [torch.relu(self.views(g.e, g.slots)) for g in groups]  # (N_g, K_g, D) r^m
        return self.attention.over_groups(groups, views)


class NAMLUser(nn.Module):
    """NAML's user encoder, u = sum_t softmax_t(q^T tanh(U r_t + u)) r_t, then the fixed prediction MLP."""

    def __init__(self, item_dim: int, cfg: ModelConfig, query_dim: int):
        super().__init__()
        self.attention = AdditiveAttention(item_dim, query_dim)
        self.predict = MLP(2 * item_dim, cfg.hidden, out_dim=1, dropout=cfg.dropout)  # paper 4.1: fixed

    def forward(
        self,
        history: torch.Tensor,
        candidate: torch.Tensor,
        hist_len: torch.Tensor,
        which: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(K, L, D) histories, (B, D) candidates, (K,) lengths, ``which`` (B,) each candidate's history
        (None: K = B) -> (B,) logits. The user vector does not depend on the candidate: once per history."""
        mask = sequence_mask(hist_len, history.shape[1])  # (K, L)
        user, _ = self.attention(history, mask)  # (K, D), zeros for an empty history
        if which is not None:
            user = take_rows(user, which)  # (B, D)
        return self.predict(torch.cat([user, candidate], dim=1)).squeeze(-1)  # (B,)


class NAML(FusionCTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        user_encoder: Literal["gru_attention", "naml"] = "gru_attention",  # group 3's shared one, see above
        query_dim: int = NAML_QUERY_DIM,
        modalities: Sequence[str] = MODALITIES,
    ):
        super().__init__(catalog, features, cfg, modalities)
        m = self.embedding.n_modalities
        self.fusion = AttentiveMultiView(m, cfg.modality_dim, cfg.rep_dim, query_dim)
        if user_encoder == "gru_attention":
            self.user = GRUAttentionUser(cfg.rep_dim, cfg)
        elif user_encoder == "naml":
            self.user = NAMLUser(cfg.rep_dim, cfg, query_dim)
        else:
            raise ValueError(f"user_encoder must be 'gru_attention' or 'naml', got {user_encoder!r}")

    def represent(self, states: ItemStates) -> torch.Tensor:
        if grouping_pays(states):
            rep, _ = self.fusion.over_groups(self.embedding.groups(states))  # (U, D)
        else:
            rep, _ = self.fusion(self.embedding(states))  # (U, M, D_e) -> (U, D), the same values
        return rep
