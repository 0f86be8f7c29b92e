"""MMSS: Multi-modal Sentence Summarization with Modality Attention and Image Filtering (Li, Zhu, Liu,
Zhang, Zong; IJCAI 2018), paper Table 2 group 3.

    items --ItemModalities--> e^m                        (U, M, D_e)    as every neural model (paper 4.2)
    r^m = ReLU(W_m e^m + b_m)                            (U, M, D)      one encoder per modality
    g = sigmoid(W_t r^title + W_i r^image + b)           (U, D)         image filter
    r^image <- g * r^image                               (U, D)         filtered image features
    beta^m = softmax_m(v^T tanh(W r^m + b))              (U, M)         modality attention
    rep = sum_m beta^m r^m                               (U, D)
    GRU over rep_t -> candidate attention -> u;  logit = MLP([u, rep_X])   (marn.models.dmf.GRUAttentionUser)

Notation: B batch, L history, U distinct items in the batch, M modalities, D = rep_dim.

MMSS summarises a sentence with the help of its image. Its two ideas, which the MARN paper names, are a
modality attention (one scalar weight per modality, softmax-normalised, on top of the attention inside
each modality) and image filters: sigmoid gates computed from the text and the image that scale the visual
features down where the image is noise to the text.

Where we depart, and why:
- No decoder. MMSS's attention queries are the decoder state at each output word; a CTR model has no
  decoder, and making the item rep depend on the candidate would break precomputing item reps (MARN
  paper 4.9.2) and the shared user model. So the modality weights and the gate come from the item's own
  modality vectors: the modality attention is additive attention without the decoder term, and the gate
  (MMSS's image context filter) sees the title and the image but no decoder state. MMSS's second filter,
  on the attention over image patches, has no counterpart: our image is one vector, not patches.
- Modalities. MMSS has two, text and image; we have four. The text is our title (Kim CNN of
  :class:`ItemModalities`, not MMSS's bi-GRU), IDs and statistics join the modality attention unfiltered.
  The image and the title are required: without either there is nothing to filter, so building MMSS
  without them raises a ValueError rather than quietly becoming another model.
- Widths: every modality gets a dense ReLU encoder to ``rep_dim`` (MARN's S_m; MMSS projects image
  features to its hidden size likewise); the attention's hidden size is ``rep_dim`` too, sized like the
  states it scores as in the attentional seq2seq models MMSS builds on.
- The user model and prediction head are group 3's shared ones (see :mod:`marn.models.dmf`), so that
  DMF, MMSS and NAML differ only in how they fuse an item's modalities; the MLP is the one the MARN paper
  fixes for all models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.dmf import FusionCTRModel, GRUAttentionUser
from marn.models.layers import MODALITIES, ItemStates, ModalityGroup, grouping_pays
from marn.models.marn import PerModalityLinear
from marn.models.naml import AdditiveAttention


class ImageFilter(nn.Module):
    """MMSS's image context filter: g = sigmoid(W_t text + W_i image + b); the image becomes g * image."""

    def __init__(self, dim: int):
        super().__init__()
        self.text = nn.Linear(dim, dim)  # W_t, b
        self.image = nn.Linear(dim, dim, bias=False)  # W_i

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) title, (U, D) image -> filtered image (U, D) and gate g (U, D) in (0, 1)."""
        gate = torch.sigmoid(self.text(text) + self.image(image))
        return gate * image, gate


class ModalityAttentionImageFilter(nn.Module):
    """Per-modality encoders, the image filter on the image slot, then modality attention."""

    def __init__(self, modalities: Sequence[str], in_dim: int, dim: int):
        super().__init__()
        missing = [m for m in ("image", "title") if m not in modalities]
        if missing:
            raise ValueError(f"MMSS filters the image by the title and needs both; missing {missing}")
        self.image_slot, self.title_slot = modalities.index("image"), modalities.index("title")
        self.encode = PerModalityLinear(len(modalities), in_dim, dim)
        self.filter = ImageFilter(dim)
        self.attention = AdditiveAttention(dim, dim)
        self.register_buffer("is_image", torch.arange(len(modalities)) == self.image_slot, persistent=False)

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, M, D_e) -> rep (U, D), modality weights beta (U, M), gate g (U, D), filtered image (U, D)."""
        r = torch.relu(self.encode(e))  # (U, M, D)
        image, gate = self.filter(r[:, self.title_slot], r[:, self.image_slot])  # (U, D) each
        r = torch.where(self.is_image[None, :, None], image[:, None, :], r)  # (U, M, D) image slot filtered
        rep, weights = self.attention(r)  # (U, D), (U, M)
        return rep, weights, gate, image

    def over_groups(
        self, groups: Sequence[ModalityGroup]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` on modality groups (``ItemModalities.groups``): the encoders and the image filter
        once per group row (image and title are the item's own: once per distinct item), the attention's
        softmax and sum once per state. Equal to ``forward`` on the stacked embeddings (tested)."""
        r = [torch.relu(self.encode(g.e, g.slots)) for g in groups]  # (N_g, K_g, D)
        at = next(j for j, g in enumerate(groups) if g.slots.start <= self.image_slot < g.slots.stop)
        group, start = groups[at], groups[at].slots.start
        if not group.slots.start <= self.title_slot < group.slots.stop:
            raise ValueError("MMSS's image filter needs the title in the image's modality group")
        image, gate = self.filter(r[at][:, self.title_slot - start], r[at][:, self.image_slot - start])
        r[at] = torch.where(self.is_image[group.slots][None, :, None], image[:, None, :], r[at])
        rep, weights = self.attention.over_groups(groups, r)  # (U, D), (U, M)
        return rep, weights, group.to_states(gate), group.to_states(image)


class MMSS(FusionCTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        modalities: Sequence[str] = MODALITIES,
    ):
        super().__init__(catalog, features, cfg, modalities)
        self.fusion = ModalityAttentionImageFilter(self.embedding.modalities, cfg.modality_dim, cfg.rep_dim)
        self.user = GRUAttentionUser(cfg.rep_dim, cfg)

    def represent(self, states: ItemStates) -> torch.Tensor:
        if grouping_pays(states):
            rep, _, _, _ = self.fusion.over_groups(self.embedding.groups(states))  # (U, D)
        else:
            rep, _, _, _ = self.fusion(self.embedding(states))  # (U, M, D_e) -> (U, D), the same values
        return rep
