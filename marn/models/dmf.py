"""DMF: Dense Multimodal Fusion (Hu, Wang, Nie, Li; ICASSP 2019), paper Table 2 group 3; and the user
model that all of group 3 (DMF, MMSS, NAML) shares.

    items --ItemModalities--> e^m                        (U, M, D_e)    as every neural model (paper 4.2)
    h_m^1 = ReLU(W_m^1 e^m),  h_m^k = ReLU(W_m^k h_m^{k-1})     (U, M, D)      one stack per modality
    z^1 = ReLU(sum_m U_m^1 h_m^1)                        (U, D)         first shared (joint) layer
    z^k = ReLU(sum_m U_m^k h_m^k + S^k z^{k-1})          (U, D)         dense: level k and shared k-1
    rep = z^K                                            (U, D)         the top shared layer
    GRU over rep_t -> candidate attention -> u;  logit = MLP([u, rep_X])   :class:`GRUAttentionUser`

Notation: B batch, L history, U distinct items in the batch, M modalities, D = rep_dim, H = sequence_dim.

What DMF is: modality-specific networks side by side, with a shared layer at every level that joins the
level's modality layers and the shared layer below, so the joint representation is built hierarchically
and the top shared layer also sees (through the lower shared layers) the shallow correlations.

Where we depart, and why:
- DMF was built for audio-visual speech recognition and cross-modal retrieval, not CTR. Its modalities are
  our four (IDs, image, title, statistics) from :class:`ItemModalities`, the same inputs as MARN's (the
  paper's fairness rule), and its input networks are the linear projections to ``modality_dim`` there.
- The top shared layer is the item representation; the user model on top is not DMF's. All of group 3
  share :class:`GRUAttentionUser` (a GRU over the history plus candidate attention, then the prediction
  MLP the MARN paper fixes for all models), so the three baselines differ only in how they fuse modalities.
  That GRU is a plain one: the behaviour property (type, time gap) has no place in it; only MARN's APGRU
  reads it.
- Depth: DMF stacks as many shared layers as its per-modality networks have levels, which depends on the
  task; we could not consult the paper's per-task depths offline. Our default of 2 is the smallest depth
  that has a shared-to-shared (dense) connection, and, on top of the input projections, gives item
  encoders as deep as MARN's (projection, S_m, fusion). All layers are ``rep_dim`` wide with ReLU, as
  MARN's S_m.
- DMF trains with a task loss only, as here (no layer-wise pre-training).
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
    CandidateAttention,
    HistoryBucket,
    ItemModalities,
    ItemStates,
    ModalityGroup,
    batch_items,
    encode_histories,
    grouping_pays,
    recent_window,
    run_gru,
    sequence_mask,
    sum_over_groups,
)
from marn.models.marn import PerModalityLinear

# --------------------------------------------------------------------------------------------------------
# Shared by group 3 (DMF, MMSS, NAML): only the item fusion differs between them
# --------------------------------------------------------------------------------------------------------


class GRUAttentionUser(nn.Module):
    """History item reps -> plain GRU -> candidate attention over its states -> MLP([u, rep_X]) -> logit.

    The candidate is projected to the GRU width only to act as the attention query; the prediction MLP
    sees it as it is, as MARN's does (paper 3.4.2).
    """

    def __init__(self, item_dim: int, cfg: ModelConfig):
        super().__init__()
        h = cfg.sequence_dim
        self.gru = nn.GRU(item_dim, h, batch_first=True)
        self.query = nn.Linear(item_dim, h) if item_dim != h else nn.Identity()
        self.attention = CandidateAttention(h, cfg.attention_hidden, normalize=True)
        self.predict = MLP(h + item_dim, cfg.hidden, out_dim=1, dropout=cfg.dropout)  # paper 4.1: fixed

    def forward(
        self,
        history: torch.Tensor,
        candidate: torch.Tensor,
        hist_len: torch.Tensor,
        which: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(K, L, D) reps of K distinct histories, (K,) their lengths, (B, D) candidate reps and ``which``
        (B,), the history of each candidate (None: K = B) -> (B,) logits."""
        states = run_gru(self.gru, history, hist_len)  # (K, L, H), zeros on padding
        mask = sequence_mask(hist_len, history.shape[1])  # (K, L)
        user = self.attention(states, self.query(candidate), mask, which)  # (B, H), zeros if no history
        return self.predict(torch.cat([user, candidate], dim=1)).squeeze(-1)  # (B,)


class FusionCTRModel(CTRModel):
    """Group 3's frame: items -> ItemModalities -> ``represent`` (the model's fusion) -> ``self.user``.

    Subclasses build their fusion and ``self.user`` and implement :meth:`represent`, which depends on
    the item alone (so item reps can be precomputed for serving, as MARN's, paper 4.9.2).
    """

    user: nn.Module  # (B, L, D), (B, D), (B,) -> (B,) logits

    def __init__(
        self, catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig, modalities: Sequence[str]
    ):
        super().__init__(catalog, features, cfg)
        self.embedding = ItemModalities(catalog, features, cfg, modalities)  # paper 3.1.1, as MARN

    def represent(self, states: ItemStates) -> torch.Tensor:
        """U item states -> (U, D) item representations."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        batch = recent_window(batch)
        unique, inverse = batch_items(batch)
        _, logits = encode_histories(batch, inverse, self.represent(unique), self._logits)
        return ModelOutput(logits)  # (B,)

    def _logits(self, bucket: HistoryBucket) -> torch.Tensor:
        return self.user(bucket.reps, bucket.candidate, bucket.lengths, bucket.which)  # (B_b,)


# --------------------------------------------------------------------------------------------------------
# DMF
# --------------------------------------------------------------------------------------------------------


class DenseMultimodalFusion(nn.Module):
    """Per-modality stacks plus a shared layer per level fed by that level and the shared layer below."""

    def __init__(self, modalities: int, in_dim: int, dim: int, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"DMF depth must be at least 1, got {depth}")
        self.specific = nn.ModuleList(
            PerModalityLinear(modalities, in_dim if k == 0 else dim, dim) for k in range(depth)
        )
        self.joint = nn.ModuleList(
            nn.Linear(modalities * dim, dim) for _ in range(depth)
        )  # sum_m U_m^k h_m^k
        self.below = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(depth - 1))  # S^k z^{k-1}

    def forward(self, e: torch.Tensor) -> list[torch.Tensor]:
        """(U, M, D_e) modality embeddings -> the shared layers z^1 .. z^K, each (U, D); z^K is the rep."""
        h = e
        shared: list[torch.Tensor] = []
        for k, (specific, joint) in enumerate(zip(self.specific, self.joint, strict=True)):
            h = torch.relu(specific(h))  # (U, M, D) level-k modality layers
            z = joint(h.flatten(1))  # (U, M * D) -> (U, D)
            if k > 0:
                z = z + self.below[k - 1](shared[-1])
            shared.append(torch.relu(z))
        return shared

    def over_groups(self, groups: Sequence[ModalityGroup]) -> list[torch.Tensor]:
        """:meth:`forward` on modality groups (``ItemModalities.groups``): the per-modality stacks and their
        share of each joint layer (sum_m U_m^k h_m^k is linear) run once per group row, so the item's own
        modalities once per distinct item; only the shared layers run once per state. Equal to ``forward``
        on the stacked embeddings (tested)."""
        hs = [g.e for g in groups]  # (N_g, K_g, D_e) each
        shared: list[torch.Tensor] = []
        for k, (specific, joint) in enumerate(zip(self.specific, self.joint, strict=True)):
            hs = [torch.relu(specific(h, g.slots)) for h, g in zip(hs, groups, strict=True)]  # (N_g, K_g, D)
            d = hs[0].shape[-1]
            z = (
                sum_over_groups(
                    groups,
                    [
                        F.linear(h.flatten(1), joint.weight[:, g.slots.start * d : g.slots.stop * d])
                        for h, g in zip(hs, groups, strict=True)
                    ],
                )
                + joint.bias
            )  # (U, D)
            if k > 0:
                z = z + self.below[k - 1](shared[-1])
            shared.append(torch.relu(z))
        return shared


class DMF(FusionCTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        depth: int = 2,  # shared layers; the least with a shared-to-shared link (see the module docstring)
        modalities: Sequence[str] = MODALITIES,
    ):
        super().__init__(catalog, features, cfg, modalities)
        self.fusion = DenseMultimodalFusion(self.embedding.n_modalities, cfg.modality_dim, cfg.rep_dim, depth)
        self.user = GRUAttentionUser(cfg.rep_dim, cfg)

    def represent(self, states: ItemStates) -> torch.Tensor:
        if grouping_pays(states):
            return self.fusion.over_groups(self.embedding.groups(states))[-1]  # (U, D) top shared layer
        return self.fusion(self.embedding(states))[-1]  # (U, M, D_e) -> (U, D), the same values
