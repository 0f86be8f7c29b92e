"""Popularity: logistic regression over the candidate's point-in-time statistics alone.

The reference every table needs beside the models: what the item's counts (and static numeric columns)
as of the sample's time give, with no ID, image, title or user history. One weight per statistic,
granularity and bucket code (the same codes the models' statistic modality embeds), so it learns any
monotone or non-monotone popularity curve. A model that cannot beat it has learned nothing but popularity.
"""

from __future__ import annotations

import torch
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import stat_code_offsets


class Popularity(CTRModel):
    def __init__(self, catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig):
        super().__init__(catalog, features, cfg)
        offsets, per_stat = stat_code_offsets(features.statistics)
        self.register_buffer("offsets", offsets, persistent=False)  # (F, G)
        self.weights = nn.Embedding(max(features.statistics.n_stats, 1) * per_stat, 1)  # one weight per code
        nn.init.zeros_(self.weights.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        codes = batch["item_stats"].long() + self.offsets  # (B, F, G)
        logits = self.bias + self.weights(codes).sum(dim=(1, 2, 3))  # (B,)
        return ModelOutput(logits=logits)
