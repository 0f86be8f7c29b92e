"""YoutubeNet (Covington, Adams & Sargin, "Deep Neural Networks for YouTube Recommendations", RecSys 2016).

    items --ItemModalities--> e^m (U, M, D) --flatten--> item vector (U, M*D)
    u = [mean_t item_t, mean_t p_t]                   (B, M*D + P)   the averaged "watch vector"
    logit = MLP([u, item_X])                          (B,)           ReLU tower, then a logistic unit

Notation: B batch, L history length, U distinct items in the batch, M modalities, D = modality_dim,
P behaviour-property width.

The paper's user representation is the average of the embeddings of the videos in the watch history,
concatenated with other user features and fed to a tower of ReLU layers. We keep that: the history is
averaged (order-free), padded positions are left out of the mean.

Where we depart and why:
- CTR setting: a ranking head that scores the candidate (its vector joins the tower's input and one
  logistic output gives the click logit) instead of the candidate-generation network's softmax over the
  whole corpus, which is how the MARN paper uses YoutubeNet as a CTR baseline.
- Item vectors are the MARN paper's modalities (IDs, image, title, statistics) from ItemModalities,
  concatenated, instead of video-ID embeddings: the paper feeds every neural baseline MARN's features.
- The behaviour property (type and time gap, paper 3.1.2) is averaged like the items and joins the tower
  as one more user feature, in the role of the paper's "example age" and other dense user features.
- The tower is the MARN paper's fixed prediction MLP (``cfg.hidden``), not the paper's 1024-512-256.
"""

from __future__ import annotations

import torch

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


class YoutubeNet(CTRModel):
    def __init__(self, catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig):
        super().__init__(catalog, features, cfg)
        self.embedding = ItemModalities(catalog, features, cfg, MODALITIES)
        self.behavior = BehaviorProperty(cfg)
        item_dim = self.embedding.n_modalities * self.embedding.dim  # M*D
        self.predict = MLP(2 * item_dim + self.behavior.dim, cfg.hidden, out_dim=1, dropout=cfg.dropout)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        unique, inverse = batch_items(batch)
        vectors = self.embedding(unique).flatten(1)  # (U, M, D) -> (U, M*D)
        candidate, history = gather_items(vectors, inverse)  # (B, M*D), (B, L, M*D)
        mask = sequence_mask(batch["hist_len"], history.shape[1])  # (B, L)
        props = self.behavior(batch["hist_behavior"], batch["hist_gap"])  # (B, L, P)
        user = torch.cat([masked_mean(history, mask), masked_mean(props, mask)], dim=1)  # (B, M*D + P)
        logits = self.predict(torch.cat([user, candidate], dim=1)).squeeze(-1)  # (B,)
        return ModelOutput(logits=logits)
