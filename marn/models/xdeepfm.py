"""xDeepFM (Lian, Zhou, Zhang, Chen, Xie & Sun, KDD 2018): linear part + CIN + DNN over field embeddings.

    items --ItemModalities--> e^m (U, M, D)
    fields X^0 = [W_m e^m_X | W_m mean_t e^m_t | W_p mean_t p_t]   (B, F, E)   F = 2M + 1 fields of width E
    linear:  w^T [e_X, mean_t e_t, mean_t p_t] + b                 (B,)        "raw features"
    CIN:     X^k_h = sum_{i,j} W^{k,h}_{ij} (X^{k-1}_i o X^0_j)     (B, H_k, E) then sum pooling over E -> p^+
    DNN:     MLP(flatten X^0)                                       (B,)
    logit = linear + w_cin^T p^+ + DNN                                          output unit (pre-sigmoid)

Notation: B batch, L history length, U distinct items, M modalities, D = modality_dim, P behaviour-property
width, F fields, E field width, H_k feature maps of CIN layer k.

Where we depart and why:
- Fields are the MARN paper's modalities instead of one-hot categorical fields: the candidate's M modality
  vectors, the user's M history modality vectors (masked means over the behaviours) and the averaged
  behaviour property, each projected linearly to one field width E (what xDeepFM's embedding layer does
  for a one-hot field). The candidate and the history share each modality's projection, so their
  interactions compare like with like. The MARN paper feeds every neural baseline MARN's features.
- The linear part is a linear map of the unprojected field vectors, our counterpart of the raw features.
- The DNN is the MARN paper's fixed prediction MLP (``cfg.hidden``), not the 400-400 of xDeepFM's runs.
- CIN keeps the paper's form: no activation on feature maps (identity, as the authors' code defaults), a
  bias per map, ``split_half`` as in the authors' code: every layer but the last sends half its maps to
  the next layer and half to the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import (
    MLP,
    MODALITIES,
    BehaviorProperty,
    ItemModalities,
    batch_items,
    gather_items,
    masked_mean,
    sequence_mask,
)


class CIN(nn.Module):
    """Compressed Interaction Network: (B, F, E) field embeddings -> (B, out_dim) p^+.

    Each layer takes the outer products along fields of X^{k-1} and X^0 (vector-wise, elementwise along E)
    and compresses the H_{k-1} * F maps to H_k with a 1x1 convolution; every layer's output maps are
    sum-pooled over E and concatenated.
    """

    def __init__(self, fields: int, layer_sizes: Sequence[int], split_half: bool = True):
        super().__init__()
        if not layer_sizes or min(layer_sizes) < 1:
            raise ValueError(f"CIN layer_sizes must be a non-empty list of positive ints, got {layer_sizes}")
        if split_half and any(size % 2 for size in layer_sizes[:-1]):
            raise ValueError(f"split_half needs even sizes for all but the last CIN layer, got {layer_sizes}")
        self.split_half = split_half
        self.convs = nn.ModuleList()
        self.next_sizes: list[int] = []  # maps handed on to the next layer, per layer
        hidden, out_dim = fields, 0
        for k, size in enumerate(layer_sizes):
            self.convs.append(nn.Conv1d(hidden * fields, size, kernel_size=1))  # W^{k,h}, one per map h
            last = k == len(layer_sizes) - 1
            hidden = size // 2 if split_half and not last else size
            self.next_sizes.append(hidden)
            out_dim += size - hidden if split_half and not last else size
        self.out_dim = out_dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        hidden = x0  # (B, F, E)
        pooled = []
        for k, conv in enumerate(self.convs):
            z = torch.einsum("bhe,bfe->bhfe", hidden, x0).flatten(1, 2)  # (B, H_{k-1} * F, E)
            maps = conv(z)  # (B, H_k, E)
            if self.split_half and k < len(self.convs) - 1:
                hidden, direct = maps.split([self.next_sizes[k], maps.shape[1] - self.next_sizes[k]], dim=1)
            else:
                hidden = direct = maps
            pooled.append(direct.sum(dim=2))  # (B, H_k') sum pooling over the embedding dimension
        return torch.cat(pooled, dim=1)  # (B, out_dim)


class XDeepFM(CTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        field_dim: int = 10,  # E: the paper's field-embedding size (4.1; the authors' config: dim 10)
        cin_layer_sizes: Sequence[int] = (100, 100),  # 100 maps a layer: the paper's Dianping/Bing News width
        split_half: bool = True,  # half of each CIN layer's maps go straight to the output, authors' code
        field_init_std: float = 0.01,  # std of the field projections' init: the authors' init_value
    ):
        super().__init__(catalog, features, cfg)
        if field_dim < 1:
            raise ValueError(f"field_dim must be >= 1, got {field_dim}")
        self.embedding = ItemModalities(catalog, features, cfg, MODALITIES)
        self.behavior = BehaviorProperty(cfg)
        m, d = self.embedding.n_modalities, self.embedding.dim
        # Field projections start small, as the authors' N(0, 0.01) embeddings: CIN is a polynomial of degree
        # k + 1 in the fields, and unit-scale fields blow it up under AdaGrad at lr 0.1 (first-epoch losses
        # in the thousands). Plain parameters (W_m, W_p), so the registry's Glorot init of Linear layers
        # leaves them as they are.
        self.field_project = nn.Parameter(torch.randn(m, d, field_dim) * field_init_std)  # W_m, per modality
        self.property_project = nn.Parameter(torch.randn(self.behavior.dim, field_dim) * field_init_std)
        fields = 2 * m + 1
        self.linear = nn.Linear(2 * m * d + self.behavior.dim, 1)  # first order, carries the global bias
        self.cin = CIN(fields, tuple(cin_layer_sizes), split_half)
        self.cin_out = nn.Linear(self.cin.out_dim, 1, bias=False)  # w_cin
        self.dnn = MLP(fields * field_dim, cfg.hidden, out_dim=1, dropout=cfg.dropout)

    def fields(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw field vectors (B, 2*M*D + P) for the linear part and field embeddings X^0 (B, F, E)."""
        unique, inverse = batch_items(batch)
        candidate, history = gather_items(self.embedding(unique), inverse)  # (B, M, D), (B, L, M, D)
        mask = sequence_mask(batch["hist_len"], history.shape[1])  # (B, L)
        pooled = masked_mean(history.flatten(2), mask).view_as(candidate)  # (B, M, D)
        props = masked_mean(self.behavior(batch["hist_behavior"], batch["hist_gap"]), mask)  # (B, P)
        items = torch.cat([candidate, pooled], dim=1)  # (B, 2M, D)
        x0 = torch.cat(
            [
                torch.einsum("bmd,mde->bme", candidate, self.field_project),  # (B, M, E)
                torch.einsum("bmd,mde->bme", pooled, self.field_project),  # (B, M, E)
                (props @ self.property_project)[:, None, :],  # (B, 1, E)
            ],
            dim=1,
        )  # (B, F, E)
        return torch.cat([items.flatten(1), props], dim=1), x0

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        raw, x0 = self.fields(batch)  # (B, 2*M*D + P), (B, F, E)
        linear = self.linear(raw).squeeze(-1)  # (B,)
        cin = self.cin_out(self.cin(x0)).squeeze(-1)  # (B,) explicit, vector-wise interactions
        dnn = self.dnn(x0.flatten(1)).squeeze(-1)  # (B,) implicit, bit-wise interactions
        return ModelOutput(logits=linear + cin + dnn)
