"""What every CTR model in the registry shares: its inputs, its output and how it is built."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from marn.data.tensors import ItemCatalog


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B,) click logits for the candidates
    aux_loss: torch.Tensor | None = None  # extra training loss (adversarial terms, DIEN's auxiliary loss)


class CTRModel(nn.Module):
    """Base class: a model sees the item catalogue at build time and a batch of encoded samples per call.

    Batches are dicts from :func:`marn.data.tensors.encode_samples`: item (B,), hist_items, hist_behavior,
    hist_gap (B, L), hist_len (B,).
    """

    def __init__(self, catalog: ItemCatalog):
        super().__init__()
        # (n_items + 1, 3) category, brand, shop codes per item code; a buffer so it moves with .to(device)
        self.register_buffer("item_attributes", torch.as_tensor(catalog.attributes), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        raise NotImplementedError
