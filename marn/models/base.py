"""What every CTR model in the registry shares: its inputs, its output and how it is built."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B,) click logits for the candidates
    aux_loss: torch.Tensor | None = None  # extra training loss, already weighted (adversarial, DIEN's aux)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # its named parts, for logging only


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a tensor that shares its memory. In a Ray worker the catalogue and feature tables are
    read-only views of the object store, shared by every worker on the node (an image table can be GiBs),
    so no copy. Nothing writes such a buffer in place (``ItemModalities.extend`` makes new tensors before
    ``overwrite`` writes rows), so torch's warning about a non-writable array is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array)


class CTRModel(nn.Module):
    """Base class: a model sees the item catalogue and item features at build time, a batch per call.

    Batches are dicts from :func:`marn.data.tensors.encode_samples`: item (B,), hist_items, hist_behavior,
    hist_gap (B, L), hist_len (B,). ``progress`` in [0, 1] is the share of training done (MARN's lambda
    schedule reads it; inference leaves the default).
    """

    def __init__(self, catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig):
        super().__init__()
        # (n_items + 1, 3) category, brand, shop codes per item code; a buffer so it moves with .to(device)
        self.register_buffer("item_attributes", shared_tensor(catalog.attributes), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        raise NotImplementedError
