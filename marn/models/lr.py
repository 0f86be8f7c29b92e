"""LR: logistic regression over the candidate's ID features (item, category, brand, shop).

The paper's first baseline; as in the paper (Section 4.3) its inputs are the IDs only, so on the DIN
protocol it learns which items and categories are clicked more often than random ones, not who clicks.
"""

from __future__ import annotations

import torch
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel, ModelOutput


class LR(CTRModel):
    def __init__(self, catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig):
        super().__init__(catalog, features, cfg)
        sizes = (len(catalog.items), len(catalog.categories), len(catalog.brands), len(catalog.shops))
        self.weights = nn.ModuleList(nn.Embedding(n, 1, padding_idx=0) for n in sizes)  # one weight per id
        for table in self.weights:
            nn.init.zeros_(table.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        item = batch["item"]  # (B,)
        ids = torch.cat([item[:, None], self.item_attributes[item]], dim=1)  # (B, 4) item, cat, brand, shop
        logits = self.bias + sum(table(ids[:, j]).squeeze(-1) for j, table in enumerate(self.weights))
        return ModelOutput(logits=logits)  # (B,)
