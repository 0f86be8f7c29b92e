"""FLIP's networks: the alignment heads and losses around a registry ID tower, and the finetuned towers.

Notation: B batch, L history length, N prompt tokens, d text width (384), H the ID tower's representation
(the input of its ``predict`` MLP), P projection width, V_i item codes, V_w the prompts' word pieces.

    h    = tower's input to its prediction MLP                       (B, H)   complete ID fields
    ICL: z = norm(P_id(h)), w = norm(P_txt(mean-pool(T)))            (B, P)
         L_icl = (CE(z w^T / tau, I) + CE(w z^T / tau, I)) / 2
    MTM: h~ from the ID fields with ``mask_ratio`` of them set to 0 (PAD: a reserved code, never an id)
         c = sum_n softmax_n(LN(W_q h~) . T_n / sqrt(d)) T_n          (B, d)   padding masked out
         logits over V_i of each masked field f from [h~; c; pos_f]; L_mtm = CE over the known items
    MLM: one candidate field's word pieces replaced by [MASK], encoded (frozen, cached): T~ at those places
         logits over V_w = W_2 tanh(W_1 [T~_n; h]) at up to ``mlm_positions`` of them; L_mlm = CE
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from marn.config import FlipConfig, ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import PAD, ItemCatalog
from marn.flip.text import TextCache
from marn.models.base import CTRModel, ModelOutput
from marn.models.catalog import MODEL_INFO
from marn.models.layers import MLP, sequence_mask
from marn.models.registry import MODELS

LOSSES = ("icl", "mtm", "mlm")
# The IDs-only registry models whose logit comes from a ``predict`` MLP, whose input is FLIP's h. lr and fm
# sum their terms into the logit and have none; a test builds every IDs-only model to keep this list true.
TOWERS = ("base_ids",)


class Projection(nn.Module):
    """The released heads: p = W1 x, out = LayerNorm(p + Dropout(W2 GELU(p)))."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.residual = nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.linear(x)
        return self.norm(p + self.residual(p))


def check_tower(name: str) -> None:
    """FLIP's ID side must be a registry model on IDs alone, so its finetuned weights serve as that model,
    and end in a ``predict`` MLP (its input is h). Cheap: called before any text is encoded."""
    if name not in MODELS:
        raise ValueError(f"flip.tower: unknown model {name!r}; registered: {', '.join(MODELS)}")
    info = MODEL_INFO.get(name)
    if info is None or info.modalities != ("ids",):
        raise ValueError(f"flip.tower: {name!r} does not read IDs alone; pick an ID model such as base_ids")
    if name not in TOWERS:
        raise ValueError(
            f"flip.tower: {name!r} has no `predict` MLP whose input could be FLIP's h (its logit is a sum "
            f"of terms); pick one of {', '.join(TOWERS)}"
        )


def tower_width(tower: CTRModel) -> int:
    """H: the input width of the tower's prediction MLP (FLIP's h)."""
    predict = getattr(tower, "predict", None)
    first = next((m for m in predict.modules() if isinstance(m, nn.Linear)), None) if predict else None
    if first is None:
        raise ValueError(f"{type(tower).__name__} has no `predict` MLP whose input could be FLIP's h")
    return first.in_features


def random_subset(candidates: torch.Tensor, count: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(R, C) bool: per row, ``count`` of its ``candidates`` (R, C) drawn uniformly (all when fewer)."""
    scores = torch.rand(candidates.shape, generator=generator).masked_fill(~candidates, 2.0)  # others last
    rank = scores.argsort(dim=1).argsort(dim=1)
    return (rank < count[:, None]) & candidates


def field_mask(batch: dict[str, torch.Tensor], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 1 + L) the ID fields MTM masks: column 0 the candidate, then history positions; per row
    max(1, floor(ratio * real fields)) of its real fields, uniformly."""
    history = sequence_mask(batch["hist_len"], batch["hist_items"].shape[1])
    real = torch.cat([torch.ones_like(history[:, :1]), history], dim=1)
    return random_subset(real, (real.sum(dim=1) * ratio).floor().clamp(min=1), generator)


def with_fields_masked(batch: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch with the masked candidates and history items replaced by PAD (their attributes with them:
    the towers look category, brand and shop up through the item code)."""
    return {
        **batch,
        "item": batch["item"].masked_fill(mask[:, 0], PAD),
        "hist_items": batch["hist_items"].masked_fill(mask[:, 1:], PAD),
    }


class FlipPretrainer(nn.Module):
    """The registry tower plus FLIP's heads; ``losses`` gives the switched-on pretraining losses."""

    def __init__(self, tower: CTRModel, cache: TextCache, n_items: int, max_history: int, cfg: FlipConfig):
        super().__init__()
        self.tower, self.cache, self.cfg = tower, cache, cfg
        width, d, p = tower_width(tower), cache.dim, cfg.projection_dim
        self.id_projection = Projection(width, p, cfg.dropout)
        self.text_projection = Projection(d, p, cfg.dropout)
        self.query = nn.Sequential(nn.Linear(width, d), nn.LayerNorm(d))  # MTM's q = LN(W_q h~)
        self.field_position = nn.Embedding(1 + max_history, p)  # which field is to be reconstructed
        self.mtm_head = nn.Sequential(nn.Linear(width + d + p, p), nn.GELU(), nn.Linear(p, n_items))
        self.mlm_head = nn.Sequential(
            nn.Linear(d + width, d), nn.Tanh(), nn.Linear(d, len(cache.masked.vocab) + 1)
        )

    def representation(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, H) h: what the tower feeds its prediction MLP (a hook for this call only, so the finetuned
        tower is the plain registry model)."""
        captured: list[torch.Tensor] = []
        handle = self.tower.predict.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
        try:
            self.tower(batch)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"expected one call of the tower's predict MLP, saw {len(captured)}")
        return captured[0]

    def losses(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        h = self.representation(batch)
        out = {}
        if "icl" in self.cfg.losses:
            out["icl"] = self.contrastive(h, batch)
        if "mtm" in self.cfg.losses:
            out["mtm"] = self.masked_tabular(batch, generator)
        if "mlm" in self.cfg.losses:
            out["mlm"] = self.masked_language(h, batch, generator)
        return out

    def contrastive(self, h: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z = F.normalize(self.id_projection(h), dim=-1)
        w = F.normalize(self.text_projection(self.cache.pooled(batch)), dim=-1)
        similarity = z @ w.T / self.cfg.temperature  # (B, B): row i's positive is column i
        target = torch.arange(len(h))
        return (F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target)) / 2

    def masked_tabular(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        mask = field_mask(batch, self.cfg.mask_ratio, generator)  # (B, 1 + L)
        masked = self.representation(with_fields_masked(batch, mask))  # (B, H)
        states, real = self.cache.token_states(batch)  # the complete prompt: (B, N, d), (B, N)
        query = self.query(masked)  # (B, d)
        scores = torch.einsum("bnd,bd->bn", states, query) / math.sqrt(states.shape[-1])
        attention = torch.softmax(scores.masked_fill(~real, float("-inf")), dim=1)
        context = torch.einsum("bn,bnd->bd", attention.nan_to_num(0.0), states)  # (B, d)
        rows, fields = mask.nonzero(as_tuple=True)
        targets = torch.cat([batch["item"][:, None], batch["hist_items"]], dim=1)[rows, fields]
        known = targets != PAD  # an unknown item (PAD, not in the catalogue) is nothing to reconstruct
        if not known.any():
            return masked.sum() * 0.0  # a zero on the graph; the mean over no target would be NaN
        rows, fields, targets = rows[known], fields[known], targets[known]
        inputs = torch.cat([masked[rows], context[rows], self.field_position(fields)], dim=1)
        return F.cross_entropy(self.mtm_head(inputs), targets)

    def masked_language(
        self, h: torch.Tensor, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        masked = self.cache.masked
        present = masked.present[batch["item"]]  # (B, F)
        rows = present.any(dim=1).nonzero().squeeze(1)
        if len(rows) == 0:
            return h.sum() * 0.0  # no candidate has a text field: nothing to reconstruct
        field = torch.multinomial(present[rows].float(), 1, generator=generator).squeeze(1)  # (R,)
        items = batch["item"][rows]
        states = masked.states[items, field].float()  # (R, P, d)
        targets = masked.targets[items, field]  # (R, P), 0 = no position
        # the output layer over V_w dominates the step: predict at most mlm_positions hidden pieces per row
        keep = random_subset(targets > 0, torch.full((len(rows),), self.cfg.mlm_positions), generator)
        at, position = keep.nonzero(as_tuple=True)
        joined = torch.cat([states[at, position], h[rows[at]]], dim=-1)  # (K, d + H)
        return F.cross_entropy(self.mlm_head(joined), targets[at, position])


class FlipTextTower(CTRModel):
    """Strategy "text" (FLIP_PLM with the encoder frozen): the pretrained text projection over the cached
    prompt vector, then an MLP to one logit."""

    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        cache: TextCache,
        projection: Projection,
    ):
        super().__init__(catalog, features, cfg)
        self.cache, self.projection = cache, projection
        self.predict = MLP(projection.linear.out_features, cfg.hidden, out_dim=1, dropout=cfg.dropout)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        return ModelOutput(self.predict(self.projection(self.cache.pooled(batch))).squeeze(-1))


class FlipJoint(nn.Module):
    """Strategy "joint" (FLIP): logit = alpha l_id + (1 - alpha) l_text with alpha = sigmoid(a), a from 0;
    each tower's own BCE is added to the training loss, as released. Called like a CTRModel (fit, predict)."""

    def __init__(self, tower: CTRModel, text: FlipTextTower):
        super().__init__()
        self.tower, self.text = tower, text
        self.mix = nn.Parameter(torch.zeros(()))

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        id_logits, text_logits = self.tower(batch).logits, self.text(batch).logits
        alpha = torch.sigmoid(self.mix)
        logits = alpha * id_logits + (1 - alpha) * text_logits
        if not self.training:
            return ModelOutput(logits)
        label = batch["label"]
        towers = {
            "bce_id": F.binary_cross_entropy_with_logits(id_logits, label),
            "bce_text": F.binary_cross_entropy_with_logits(text_logits, label),
        }
        aux = {name: loss.detach() for name, loss in towers.items()} | {"alpha": alpha.detach()}
        return ModelOutput(logits, aux_loss=sum(towers.values()), aux=aux)
