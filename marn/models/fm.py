"""FM: Factorization Machine (Rendle, ICDM 2010) over ID features, as the MARN paper's second baseline.

    y(x) = w_0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j                        Rendle Eq. 1
    sum_{i<j} <v_i, v_j> x_i x_j
        = 1/2 sum_k [(sum_i v_ik x_i)^2 - sum_i v_ik^2 x_i^2]                        Lemma 3.1, O(kn)

Notation: B batch, L history length, N = 4 + 2L features per sample, K factor size.

Features x (all one-hot or normalised multi-hot, so every x_i is 1, 1/n or 0):
- the candidate's item, category, brand and shop ids (x_i = 1 each);
- the user's history as two implicit-feedback bags, history item ids and history category ids, each
  real behaviour with x_i = 1/n (n = history length), as the "other movies rated" block of Rendle's
  Figure 1 (and SVD++). The bags have their own tables, separate from the candidate's ids, like Rendle's
  separate blocks; they are what lets FM model user x item interactions without a user id.

Where we depart and why:
- IDs only: the MARN paper (4.2) feeds LR and FM the ID features alone. The history bags hold item and
  category ids, the per-behaviour features of DIN's Amazon setting; brand and shop stay candidate-only.
- A history position is one feature: an item that occurs twice in a history is two features with x = 1/n
  each (so the pair interacts once) instead of one feature with x = 2/n; the difference is that one
  self-pair and vanishes when histories hold distinct items.
- Trained as a CTR classifier (logit, log loss), one of the tasks Rendle lists.
"""

from __future__ import annotations

import torch
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import sequence_mask


class FM(CTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        factor_dim: int = 16,  # k; Rendle fixes none. MARN's smallest ID width (category, paper 4.1)
        init_std: float = 0.1,  # factor init N(0, 0.1^2): libFM's default init_stdev
    ):
        super().__init__(catalog, features, cfg)
        if factor_dim < 1:
            raise ValueError(f"factor_dim must be >= 1, got {factor_dim}")
        # candidate item, category, brand, shop; then the history item and history category bags
        sizes = (
            len(catalog.items),
            len(catalog.categories),
            len(catalog.brands),
            len(catalog.shops),
            len(catalog.items),
            len(catalog.categories),
        )
        self.weights = nn.ModuleList(nn.Embedding(n, 1, padding_idx=0) for n in sizes)  # w_i, first order
        self.factors = nn.ModuleList(nn.Embedding(n, factor_dim, padding_idx=0) for n in sizes)  # v_i
        for w, v in zip(self.weights, self.factors, strict=True):
            nn.init.zeros_(w.weight)
            nn.init.normal_(v.weight, std=init_std)
            with torch.no_grad():
                v.weight[0].zero_()  # PAD / unknown ids carry no factor
        self.bias = nn.Parameter(torch.zeros(1))  # w_0

    def features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-zero features of each sample with x_i folded in: w_i x_i (B, N) and v_i x_i (B, N, K).

        Padded history positions get x_i = 0, so they add nothing to either order.
        """
        item, hist = batch["item"], batch["hist_items"]  # (B,), (B, L)
        # (B, 4) the candidate's item, category, brand, shop codes
        candidate = torch.cat([item[:, None], self.item_attributes[item]], dim=1)
        hist_ids = torch.stack([hist, self.item_attributes[hist][..., 0]], dim=1)  # (B, 2, L) item, category
        mask = sequence_mask(batch["hist_len"], hist.shape[1])  # (B, L)
        x = mask.float() / batch["hist_len"].clamp(min=1)[:, None].float()  # (B, L) 1/n on real behaviours

        w_cand = torch.cat([self.weights[j](candidate[:, j]) for j in range(4)], dim=1)  # (B, 4)
        v_cand = torch.stack([self.factors[j](candidate[:, j]) for j in range(4)], dim=1)  # (B, 4, K)
        w_hist = torch.cat([self.weights[4 + j](hist_ids[:, j]).squeeze(-1) * x for j in range(2)], dim=1)
        v_hist = torch.cat([self.factors[4 + j](hist_ids[:, j]) * x[..., None] for j in range(2)], dim=1)
        return torch.cat([w_cand, w_hist], dim=1), torch.cat([v_cand, v_hist], dim=1)  # (B, N), (B, N, K)

    @staticmethod
    def pairwise(factors: torch.Tensor) -> torch.Tensor:
        """(B, N, K) v_i x_i -> (B,) sum_{i<j} <v_i x_i, v_j x_j> by the sum-square trick, O(KN)."""
        square_of_sum = factors.sum(dim=1).pow(2)  # (B, K)
        sum_of_squares = factors.pow(2).sum(dim=1)  # (B, K)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)

    def second_order(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) the factorised interaction term of Rendle's Eq. 1."""
        return self.pairwise(self.features(batch)[1])

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        weights, factors = self.features(batch)  # (B, N), (B, N, K)
        logits = self.bias + weights.sum(dim=1) + self.pairwise(factors)  # (B,)
        return ModelOutput(logits=logits)
