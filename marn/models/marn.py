"""MARN: Multimodal Adversarial Representation Network (Li et al., WWW 2020), and its ablations.

    item states --ItemModalities--> e^m (U, M, D_e)                     paper 3.1, Eq. 1
    e^m --S_m--> s^m,  e^m --I--> c^m                    (U, M, D)      paper 3.2
    s = sum_m tanh(W_m s^m + b_m) * s^m                  (U, D)         MAF, Eq. 2-3
    D0(c^m, gradient into I stopped); w^m = 1 - D0^m(c^m), detached     DDMA, 3.3.2
    D1(GRL(I(e^m detached))) weighted by w^m / mean(w); c = max_m w^m c^m   (U, D)   Eq. 7
    Ds = D1's weights on S_m(e^m) with e^m detached                     3.3.3
    rep = s + c;  APGRU over (rep_t, p_t) + candidate attention -> u_X  3.4.1
    logit = MLP([u_X, rep_X])                                           3.4.2
    loss = L_ctr + lambda (L_Ds + L_D0 + L_adv),  lambda = lambda0 (2 / (1 + exp(-gamma p)) - 1)

Notation: B batch, L history, U distinct item states in the batch (an item with its statistics as of the
sample's time), M modalities, D = rep_dim, H = sequence_dim, F statistics, G their granularities.

Eq. 10 is missing from the paper; docs/design.md gives our reading, which this file implements. The choices
the paper leaves open are fields of :class:`marn.config.ModelConfig` or of :class:`Variant` below:
discriminators are linear M-way classifiers (``discriminator_hidden`` = 0); S_m and I are Linear + ReLU;
discriminator losses are averaged over the distinct, non-padding items of a batch; Eq. 7's weights w^m
scale each item's log-likelihood (``d1_weighting="loss"``) rather than its input. The adversary's switches
(``d1_weights``, ``pool_weights``, ``reversal_reaches``, ``lambda_role``) are documented on ModelConfig.

Ablations (paper Table 3) are the same network with parts switched off, see ``VARIANTS``:
BaseModel = one modality or a fusion of them, a plain GRU whose last state is the user vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import PAD, ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import (
    MLP,
    MODALITIES,
    BehaviorProperty,
    HistoryBucket,
    ItemModalities,
    ItemStates,
    batch_items,
    encode_histories,
    grad_reverse,
    last_state,
    masked_softmax,
    packing_pays,
    recent_window,
    run_gru,
    sequence_mask,
    take_rows,
)


@dataclass(frozen=True)
class Variant:
    modalities: tuple[str, ...] = MODALITIES
    fusion: Literal["single", "sum", "maf"] = "maf"  # single modality | CONC (sum) | MAF (vector attention)
    adversarial: Literal["none", "adv", "ddma"] = "ddma"  # none | one plain discriminator | D0 + D1 + Ds
    sequence: Literal["gru", "apgru"] = "apgru"  # plain GRU, last state | APGRU + candidate attention


VARIANTS: dict[str, Variant] = {
    "base_ids": Variant(("ids",), "single", "none", "gru"),
    "base_image": Variant(("image",), "single", "none", "gru"),
    "base_conc": Variant(MODALITIES, "sum", "none", "gru"),
    "base_maf": Variant(MODALITIES, "maf", "none", "gru"),
    "base_maf_adv": Variant(MODALITIES, "maf", "adv", "gru"),
    "base_maf_ddma": Variant(MODALITIES, "maf", "ddma", "gru"),
    "marn": Variant(MODALITIES, "maf", "ddma", "apgru"),
}


@dataclass
class ItemParts:
    """The intermediates of an item's representation, for the losses, the tests and the figures."""

    e: torch.Tensor  # (U, M, D_e) projected modality embeddings e^m
    specific: torch.Tensor  # (U, M, D) s^m
    atten: torch.Tensor | None  # (U, M, D) MAF's vector attention (None without MAF)
    s: torch.Tensor  # (U, D) fused modality-specific representation
    rep: torch.Tensor  # (U, D) rep = s + c (= s without the adversarial branch)
    invariant: torch.Tensor | None = None  # (U, M, D) c^m
    w: torch.Tensor | None = None  # (U, M) importance weights w^m (ones for ADV)
    c: torch.Tensor | None = None  # (U, D) max_m w^m c^m
    d0_logits: torch.Tensor | None = None  # (U, M, M) D0 on each c^m
    ds_input: torch.Tensor | None = None  # (U, M, D) Ds' input S_m(e^m), e^m detached; training
    adv_input: torch.Tensor | None = None  # (U, M, D) D1's input: c^m, I's own input detached; training


@dataclass
class FactoredParts:
    """:meth:`MARN.decompose`'s intermediates where they are computed: the item's own modalities (IDs,
    image, title) once per distinct item, the statistics once per state, and rep combined per state.

    A batch holds many states of few items (the same item on many days) and only the statistics differ
    between them, so the per-item parts are never copied out per state: training reads them here, with
    each item counted once per real state that holds it (:meth:`MARN.adversary`). :meth:`expand` gives
    the per-state :class:`ItemParts` the tests and figures read."""

    inverse: torch.Tensor  # (U,) each state's row of ``per_item``
    per_item: dict[str, torch.Tensor | None] | None  # (U_i, M', ...) the M' modalities other than stats
    per_state: dict[str, torch.Tensor | None] | None  # (U, 1, ...) the statistics
    slots: tuple[torch.Tensor | None, torch.Tensor | None]  # the modality index of each part's slots
    s: torch.Tensor  # (U, D)
    rep: torch.Tensor  # (U, D)
    c: torch.Tensor | None = None  # (U, D)

    def parts(self) -> list[tuple[dict[str, torch.Tensor | None], torch.Tensor]]:
        """The computed parts with their slots' modality indices: per item first, then per state."""
        pairs = zip((self.per_item, self.per_state), self.slots, strict=True)
        return [(part, at) for part, at in pairs if part is not None and at is not None]

    def expand(self) -> ItemParts:
        """Every intermediate per state, (U, M, ...), as if all were computed per state."""
        keys = ("e", "specific", "atten", "invariant", "w", "d0_logits", "ds_input", "adv_input")
        merged: dict[str, torch.Tensor | None] = {}
        for key in keys:
            pieces = [
                (take_rows(part[key], self.inverse) if part is self.per_item else part[key])
                for part, _ in self.parts()
                if part[key] is not None
            ]
            merged[key] = torch.cat(pieces, 1) if pieces else None
        e, specific, atten = merged.pop("e"), merged.pop("specific"), merged.pop("atten")
        return ItemParts(e, specific, atten, self.s, self.rep, c=self.c, **merged)


def _over_batch_mean(w: torch.Tensor) -> torch.Tensor:
    """w / mean(w) over every entry (IWAN's normalisation); an empty w stays empty."""
    if w.numel() == 0:
        return w
    return w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)


def adversarial_weight(progress: float, lambda0: float, gamma: float) -> float:
    """The paper's schedule (4.1): lambda grows from 0 to ~lambda0 as training progress p goes 0 -> 1."""
    return lambda0 * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


class _ReLULinearOfConstant(torch.autograd.Function):
    """relu(x W + b) for a constant x, from its value already computed with a live x: the same numbers,
    and a gradient that reaches W and b only. Saves recomputing the product where a loss must not reach
    the embedding (Ds' input S_m(e^m), D1's input I(e^m) with e^m detached)."""

    @staticmethod
    def forward(ctx, value, x, weight, bias, per_modality: bool):
        ctx.save_for_backward(value, x)
        ctx.per_modality = per_modality
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        value, x = ctx.saved_tensors
        g = grad * (value > 0).to(grad.dtype)  # through the ReLU
        if (
            ctx.per_modality
        ):  # value (U, K, O) = relu(einsum("uki,kio->uko", x, W) + b), W (K, I, O), b (K, O)
            return None, None, torch.einsum("uki,uko->kio", x, g), g.sum(0), None
        flat_g, flat_x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # nn.Linear: W (O, I), b (O,)
        return None, None, flat_g.t() @ flat_x, flat_g.sum(0), None


def relu_linear_of_constant(
    value: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, per_modality: bool
) -> torch.Tensor:
    """``value`` = relu(x W + b) (nn.Linear's layout, or PerModalityLinear's with ``per_modality``) as if x
    were detached: equal to recomputing it from ``x.detach()``, without the product."""
    return _ReLULinearOfConstant.apply(value.detach(), x.detach(), weight, bias, per_modality)


def per_modality_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (U, K, I) through K maps, W (K, I, O) and b (K, O) -> (U, K, O). One map (the statistics, per
    state) is one addmm: the batched product and separate bias add cost about twice as much there."""
    if weight.shape[0] == 1:
        return torch.addmm(bias[0], x[:, 0], weight[0]).unsqueeze(1)
    return torch.einsum("uki,kio->uko", x, weight) + bias


def over_modalities(x: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(U, K, D) -> (U, D) by ``reduce`` over K; with K = 1 the slot itself (a reduction over one slot is a
    copy forward and a masked scatter backward, for the same numbers)."""
    return x[:, 0] if x.shape[1] == 1 else reduce(x)


class PerModalityLinear(nn.Module):
    """M independent linear maps applied in one einsum: (U, M, D_in) -> (U, M, D_out)."""

    def __init__(self, modalities: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(modalities, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(modalities, out_dim))
        bound = math.sqrt(6.0 / (in_dim + out_dim))  # Glorot uniform, as layers.glorot_init
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, slots: slice = slice(None)) -> torch.Tensor:
        """(U, K, D_in) -> (U, K, D_out) by the maps of the K modalities at ``slots`` (default: all M)."""
        return per_modality_affine(x, self.weight[slots], self.bias[slots])


class MultimodalAttentionFusion(nn.Module):
    """MAF, Eq. 2-3: vector attention atten^m = tanh(W_m s^m + b_m) per modality; s = sum_m atten^m * s^m."""

    def __init__(self, modalities: int, dim: int):
        super().__init__()
        self.attention = PerModalityLinear(modalities, dim, dim)

    def forward(self, specific: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        atten = torch.tanh(self.attention(specific))  # (U, M, D): one weight per modality and dimension
        return (atten * specific).sum(1), atten  # (U, D), (U, M, D)


class APGRU(nn.Module):
    """Attentional Property GRU (paper 3.4.1).

    The update gate sees the behaviour property: u_t = sigmoid(W^u rep_t + P^u p_t + U^u h_{t-1} + b^u);
    reset gate and candidate state are a standard GRU's; h_t = (1 - u_t) h_{t-1} + u_t h~_t. Then an MLP
    over [h_t, rep_X] scores each step and the softmax-weighted sum of h_t is the user vector u_X.
    """

    def __init__(self, input_dim: int, property_dim: int, hidden: int, attention_hidden: tuple[int, ...]):
        super().__init__()
        self.input = nn.Linear(input_dim, 3 * hidden)  # W^r, W^u, W^h
        self.property = nn.Linear(property_dim, hidden, bias=False)  # P^u
        self.recurrent = nn.Linear(hidden, 3 * hidden, bias=False)  # U^r, U^u, U^h
        self.attention = MLP(hidden + input_dim, attention_hidden, out_dim=1)
        self.hidden = hidden

    def states(self, reps: torch.Tensor, props: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, L, D), (B, L, P), (B, L) -> hidden states (B, L, H) and update gates (B, L, H).

        The reference: the paper's equations step by step (tests and figures read the gates). Training and
        serving run :meth:`fused_states`, tested equal to it."""
        x_r, x_u, x_h = self.input(reps).chunk(3, dim=-1)  # each (B, L, H), all steps at once
        x_u = x_u + self.property(props)
        h = reps.new_zeros(reps.shape[0], self.hidden)  # (B, H)
        states, gates = [], []
        for t in range(reps.shape[1]):
            h_r, h_u, h_h = self.recurrent(h).chunk(3, dim=-1)
            r = torch.sigmoid(x_r[:, t] + h_r)
            u = torch.sigmoid(x_u[:, t] + h_u)
            candidate = torch.tanh(x_h[:, t] + r * h_h)
            h = torch.where(mask[:, t, None], (1 - u) * h + u * candidate, h)  # padding keeps the state
            states.append(h)
            gates.append(u)
        return torch.stack(states, 1), torch.stack(gates, 1)

    def fused_states(self, reps: torch.Tensor, props: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The hidden states of :meth:`states` (0 on padding) from one ATen GRU call instead of a Python loop.

        The property enters the update gate only, so APGRU is a standard GRU over x_t = [rep_t; p_t] whose
        reset and candidate weights are 0 on p_t. PyTorch's GRU keeps z = 1 - u (h' = (1 - z) n + z h), so
        the update gate's weights and bias enter negated: sigmoid(-a) = 1 - sigmoid(a). Histories are
        left-aligned (``mask`` is a prefix), so the real steps' states equal the loop's.
        """
        h = self.hidden
        w_r, w_u, w_h = self.input.weight.chunk(3, dim=0)  # each (H, D)
        b_r, b_u, b_h = self.input.bias.chunk(3, dim=0)  # each (H,)
        u_r, u_u, u_h = self.recurrent.weight.chunk(3, dim=0)  # each (H, H)
        none = w_r.new_zeros(h, props.shape[-1])  # (H, P): the property stays out of r and h~
        weight_ih = torch.cat(
            [torch.cat([w_r, none], 1), -torch.cat([w_u, self.property.weight], 1), torch.cat([w_h, none], 1)]
        )  # (3H, D + P)
        weight_hh = torch.cat([u_r, -u_u, u_h])  # (3H, H)
        bias_ih, bias_hh = torch.cat([b_r, -b_u, b_h]), w_r.new_zeros(3 * h)
        x = torch.cat([reps, props], dim=-1)  # (B, L, D + P)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh]
        lengths = mask.sum(1)
        if not packing_pays(lengths, x.shape[1]):  # padding steps run after the real ones: harmless
            h0 = reps.new_zeros(1, reps.shape[0], h)
            states, _ = torch.gru(x, h0, weights, True, 1, 0.0, self.training, False, True)  # (B, L, H)
            return states * mask[..., None].to(states.dtype)
        # Packed: real behaviours only; an empty history runs one padding step, masked below.
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        h0 = reps.new_zeros(1, reps.shape[0], h)[:, packed.sorted_indices]
        data, _ = torch.gru(packed.data, packed.batch_sizes, h0, weights, True, 1, 0.0, self.training, False)
        states, _ = nn.utils.rnn.pad_packed_sequence(
            packed._replace(data=data), batch_first=True, total_length=reps.shape[1]
        )
        return states * mask[..., None].to(states.dtype)  # (B, L, H)

    def forward(
        self,
        reps: torch.Tensor,
        props: torch.Tensor,
        mask: torch.Tensor,
        candidate: torch.Tensor,
        which: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """K distinct histories (reps (K, L, D), props (K, L, P), mask (K, L)), B candidates (B, D) and
        ``which`` (B,), the history each candidate's sample reads (None: K = B) -> user vectors (B, H)."""
        return self.attend(self.fused_states(reps, props, mask), mask, candidate, which)

    def attend(
        self,
        states: torch.Tensor,
        mask: torch.Tensor,
        candidate: torch.Tensor,
        which: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Candidate attention: states (K, L, H), mask (K, L) of K histories, candidate reps (B, D) and the
        history of each (``which`` (B,), None when K = B) -> user vectors (B, H)."""
        # MLP([h_t, rep_X]): its first layer splits into a per-step part, run once per distinct history,
        # and a per-candidate part
        first = self.attention[0]
        w_state, w_candidate = first.weight.split([states.shape[-1], candidate.shape[-1]], dim=1)
        per_step = F.linear(states, w_state)  # (K, L, A)
        if which is not None:
            states, mask, per_step = (take_rows(t, which) for t in (states, mask, per_step))  # (B, L, ...)
        hidden = per_step + F.linear(candidate, w_candidate, first.bias)[:, None, :]  # (B, L, A)
        scores = self.attention.after_first(hidden).squeeze(-1)  # (B, L)
        return torch.einsum("bl,blh->bh", masked_softmax(scores, mask), states)  # (B, H)


class MARN(CTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        variant: Variant = VARIANTS["marn"],
        d1_weighting: Literal["loss", "input"] = "loss",
    ):
        super().__init__(catalog, features, cfg)
        self.variant, self.cfg, self.d1_weighting = variant, cfg, d1_weighting
        self.embedding = ItemModalities(catalog, features, cfg, variant.modalities)  # paper 3.1.1
        m, d = self.embedding.n_modalities, cfg.rep_dim
        self.specific = PerModalityLinear(m, cfg.modality_dim, d)  # S_m: own weights per modality
        if variant.fusion == "maf":
            self.fusion = MultimodalAttentionFusion(m, d)
        if variant.adversarial != "none":
            if m < 2:
                raise ValueError("adversarial variants need at least two modalities")
            self.invariant = nn.Linear(cfg.modality_dim, d)  # I: shared across modalities
            self.d1 = self._discriminator(d, m)  # modality discriminator (also Ds: shared weights)
            if cfg.ds_weights == "own" and variant.adversarial == "ddma":
                self.ds = self._discriminator(d, m)  # a switch: Ds apart from D1
        if variant.adversarial == "ddma":
            self.d0 = self._discriminator(d, m)  # importance discriminator
        if variant.sequence == "apgru":
            self.behavior = BehaviorProperty(cfg)  # paper 3.1.2
            self.sequence = APGRU(d, self.behavior.dim, cfg.sequence_dim, cfg.attention_hidden)
        else:
            self.sequence = nn.GRU(d, cfg.sequence_dim, batch_first=True)
        self.predict = MLP(cfg.sequence_dim + d, cfg.hidden, out_dim=1, dropout=cfg.dropout)  # paper 3.4.2
        self.register_buffer("modality_labels", torch.arange(m), persistent=False)

    @property
    def ds_discriminator(self) -> nn.Module:
        """Ds: D1 itself (the paper's shared discriminating matrix) unless ``ds_weights="own"``."""
        return self.ds if self.cfg.ds_weights == "own" else self.d1

    def _discriminator(self, dim: int, classes: int) -> nn.Module:
        if self.cfg.discriminator_hidden:
            return MLP(dim, (self.cfg.discriminator_hidden,), out_dim=classes)
        return nn.Linear(dim, classes)

    # -- item representations ---------------------------------------------------------------------------

    def decompose(self, states: ItemStates) -> ItemParts:
        """U item states -> every intermediate of paper 3.1-3.3 for these states (see ItemParts)."""
        return self.factor(states).expand()

    def factor(self, states: ItemStates) -> FactoredParts:
        """U item states -> their intermediates, computed once per distinct item for every modality but
        the statistics and once per state for the statistics; s, c and rep per state.

        s is a sum over modalities and c a max over them, so both combine the per-item and per-state
        parts exactly as if every part were computed per state."""
        groups = {g.rows is None: g for g in self.embedding.groups(states)}  # per state: True
        own, stats = groups.get(False), groups.get(True)
        inverse = own.rows if own is not None else torch.unique(states.items, return_inverse=True)[1]  # (U,)
        rest = [] if own is None else list(range(own.slots.start, own.slots.stop))
        per_item = None if own is None else self._parts(own.e, rest)  # (U_i, M', ...)
        per_state = None if stats is None else self._parts(stats.e, [stats.slots.start])  # (U, 1, ...)
        device = states.items.device
        slots = (
            torch.tensor(rest, device=device) if rest else None,
            torch.tensor([stats.slots.start], device=device) if stats is not None else None,
        )

        def per_state_of(values_of: Callable[[dict[str, torch.Tensor | None]], torch.Tensor]) -> list:
            """A (U, ...) tensor of each computed part: the per-item ones gathered to their states."""
            out = []
            if per_item is not None:
                out.append(take_rows(values_of(per_item), inverse))
            if per_state is not None:
                out.append(values_of(per_state))
            return out

        def fused(p: dict[str, torch.Tensor | None]) -> torch.Tensor:  # (N, D): MAF's or CONC's sum
            terms = p["specific"] if p["atten"] is None else p["atten"] * p["specific"]  # (N, K, D)
            return over_modalities(terms, lambda t: t.sum(1))

        s = sum(per_state_of(fused))  # (U, D)
        if self.variant.adversarial == "none":
            return FactoredParts(inverse, per_item, per_state, slots, s, rep=s)
        pooled = per_state_of(
            lambda p: over_modalities(p["w"][..., None] * p["invariant"], lambda t: t.amax(1))
        )  # (U, D) each
        c = pooled[0] if len(pooled) == 1 else torch.maximum(*pooled)  # (U, D) max_m w^m c^m
        if self.cfg.pool_weights == "per_item":  # max_m of (M w^m / sum_k w^k) c^m
            c = c * self._per_item_scale(sum(per_state_of(lambda p: p["w"].sum(1, keepdim=True))))
        return FactoredParts(inverse, per_item, per_state, slots, s, rep=s + c, c=c)

    def _per_item_scale(self, w_sum: torch.Tensor) -> torch.Tensor:
        """M / sum_m w^m (U, 1): a positive factor per item, so it commutes with the max over modalities."""
        return self.embedding.n_modalities / w_sum.clamp_min(torch.finfo(w_sum.dtype).tiny)

    def pool_weights(self, w: torch.Tensor) -> torch.Tensor:
        """(U, M) w^m -> the weights c = max_m(weight^m c^m) uses: raw, or M w^m / sum_k w^k per item."""
        if self.cfg.pool_weights == "raw":
            return w
        return w * self._per_item_scale(w.sum(1, keepdim=True))

    def d1_weights(self, w: torch.Tensor) -> torch.Tensor:
        """(U', M) w^m of a batch's real items -> the weights of D1's loss: w / mean(w) (IWAN) or raw."""
        return w if self.cfg.d1_weights == "raw" else _over_batch_mean(w)

    def _parts(self, e: torch.Tensor, index: list[int]) -> dict[str, torch.Tensor | None]:
        """e (U, K, D_e) of the modalities at ``index`` -> their per-modality intermediates, each (U, K, ...):
        e, s^m, atten^m (MAF), c^m, D0's logits (U, K, M), w^m (U, K), and in training D1's input (adversarial
        variants) and Ds' input (DDMA)."""
        at = torch.tensor(index, device=e.device)
        # the modalities' own weights; a slice when they are adjacent (always, in MODALITIES order): its
        # backward writes one block instead of accumulating through an index
        rows = slice(index[0], index[-1] + 1) if index == list(range(index[0], index[-1] + 1)) else at
        weight, bias = self.specific.weight[rows], self.specific.bias[rows]  # S_m of these modalities
        specific = torch.relu(per_modality_affine(e, weight, bias))  # (U, K, D) s^m
        out: dict[str, torch.Tensor | None] = {"e": e, "specific": specific, "atten": None}
        out |= {"invariant": None, "w": None, "d0_logits": None, "ds_input": None, "adv_input": None}
        if self.variant.fusion == "maf":
            attention = self.fusion.attention
            out["atten"] = torch.tanh(
                per_modality_affine(specific, attention.weight[rows], attention.bias[rows])
            )  # (U, K, D): one weight per modality and dimension
        if self.variant.adversarial == "none":
            return out
        invariant = torch.relu(self.invariant(e))  # (U, K, D) c^m
        out["invariant"] = invariant
        if self.training:  # D1 plays "for updating I": I(e^m) again, its input detached, stops the reversal
            reach_e = self.cfg.reversal_reaches == "embedding"
            out["adv_input"] = (
                invariant
                if reach_e
                else relu_linear_of_constant(invariant, e, self.invariant.weight, self.invariant.bias, False)
            )
        if self.variant.adversarial == "adv":
            out["w"] = torch.ones(invariant.shape[:2], device=e.device)  # ADV: no importance weights
            return out
        logits = self.d0(invariant.detach())  # (U, K, M): no gradient of L_D0 reaches I
        own = torch.softmax(logits, -1).gather(-1, at[None, :, None].expand(len(e), -1, 1)).squeeze(-1)
        out["d0_logits"], out["w"] = logits, (1.0 - own).detach()  # w^m in [0, 1], a constant
        if self.training:  # Ds: D1's weights on S_m(e^m), the gradient stopped before the embedding layer
            out["ds_input"] = relu_linear_of_constant(specific, e, weight, bias, True)  # (U, K, D)
        return out

    def adversarial_losses(
        self, states: ItemStates, parts: ItemParts, extractor_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """L_adv (D1 vs I through the GRL), L_D0 and L_Ds on the non-padding items; {} without DDMA/ADV.

        ``extractor_scale``: the share of its discriminator's gradient that I (reversed) and S_m get; the
        discriminators always get all of theirs (``lambda_role="reversal"`` passes lambda here)."""
        if self.variant.adversarial == "none":
            return {}
        if parts.adv_input is None:
            raise ValueError("the adversarial losses need the parts of a model in training mode")
        real = states.items != PAD  # padding rows carry no modality
        losses = {"adv": self._d1_loss(parts.adv_input[real], parts.w[real], extractor_scale)}
        if self.variant.adversarial == "ddma":
            losses["d0"] = self._modality_ce(parts.d0_logits[real])
            ds_input = parts.ds_input[real]  # S_m(e^m), e^m detached
            if extractor_scale != 1.0:
                ds_input = grad_reverse(ds_input, -extractor_scale)  # S_m's gradient scaled, not reversed
            losses["ds"] = self._modality_ce(self.ds_discriminator(ds_input))
        return losses

    def adversary(
        self, states: ItemStates, parts: FactoredParts, extractor_scale: float = 1.0
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Training's path to :meth:`adversarial_losses` and :meth:`adversarial_diagnostics` (equal to them
        on ``parts.expand()``, tested): each per-item slot is scored once and counts once per real state
        that holds the item, and the diagnostics reuse the losses' logits. ({}, {}) without DDMA/ADV."""
        if self.variant.adversarial == "none":
            return {}, {}
        computed = parts.parts()
        if any(p["adv_input"] is None for p, _ in computed):
            raise ValueError("the adversarial losses need the parts of a model in training mode")
        real = states.items != PAD  # (U,) padding rows carry no modality
        n_items = len(parts.per_item["e"]) if parts.per_item is not None else 0
        rows = [torch.bincount(parts.inverse[real], minlength=n_items), real]  # real states per item / state
        rows = [
            r.to(parts.rep.dtype)
            for r, p in zip(rows, (parts.per_item, parts.per_state), strict=True)
            if p is not None
        ]
        n_real = real.sum().clamp_min(1)
        entries = n_real * self.embedding.n_modalities

        def mean(values: list[torch.Tensor]) -> torch.Tensor:
            """Per-part (N, K) values -> their mean over the real (state, modality) entries."""
            return sum((v * r[:, None]).sum() for v, r in zip(values, rows, strict=True)) / entries

        def ce(logits: list[torch.Tensor]) -> list[torch.Tensor]:  # each (N, K, M) -> (N, K)
            return [
                F.cross_entropy(x.flatten(0, 1), at.expand(len(x), -1).flatten(), reduction="none").view(
                    x.shape[:2]
                )
                for x, (_, at) in zip(logits, computed, strict=True)
            ]

        def accuracy(logits: list[torch.Tensor]) -> torch.Tensor:
            return mean(
                [(x.argmax(-1) == at).to(x.dtype) for x, (_, at) in zip(logits, computed, strict=True)]
            )

        w = [p["w"] for p, _ in computed]  # each (N, K), constants
        w_mean = mean(w).clamp_min(torch.finfo(parts.rep.dtype).tiny)
        d1_w = w if self.cfg.d1_weights == "raw" else [x / w_mean for x in w]
        adv_inputs = [p["adv_input"] for p, _ in computed]
        if self.d1_weighting == "input":
            weighted = [x[..., None] * a for x, a in zip(d1_w, adv_inputs, strict=True)]
            losses = {"adv": mean(ce([self.d1(grad_reverse(a, extractor_scale)) for a in weighted]))}
            with torch.no_grad():
                adv_logits = [self.d1(a) for a in adv_inputs]
        else:
            adv_logits = [self.d1(grad_reverse(a, extractor_scale)) for a in adv_inputs]  # each (N, K, M)
            losses = {"adv": mean([c * x for c, x in zip(ce(adv_logits), d1_w, strict=True)])}
        with torch.no_grad():
            diagnostics = {"d1_ce": mean(ce(adv_logits)), "d1_acc": accuracy(adv_logits)}
        if self.variant.adversarial == "adv":
            return losses, diagnostics
        d0_logits = [p["d0_logits"] for p, _ in computed]
        ds_inputs = [p["ds_input"] for p, _ in computed]  # S_m(e^m), e^m detached
        if extractor_scale != 1.0:
            ds_inputs = [grad_reverse(x, -extractor_scale) for x in ds_inputs]  # S_m's share scaled
        ds_logits = [self.ds_discriminator(x) for x in ds_inputs]
        losses |= {"d0": mean(ce(d0_logits)), "ds": mean(ce(ds_logits))}
        with torch.no_grad():
            diagnostics |= {"d0_acc": accuracy(d0_logits), "ds_acc": accuracy(ds_logits)}
            diagnostics |= self._weight_means(parts, real, n_real, w_mean)
        return losses, diagnostics

    def _weight_means(
        self, parts: FactoredParts, real: torch.Tensor, n_real: torch.Tensor, w_mean: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per modality, the mean over real states of w^m raw, over the batch mean, and (per-item pool
        weights only) as the max-pool uses them."""
        w = torch.cat(
            [take_rows(p["w"], parts.inverse) if p is parts.per_item else p["w"] for p, _ in parts.parts()], 1
        )  # (U, M) a small gather: M numbers per state
        kinds = {"w_raw": w, "w_norm": w / w_mean}
        if self.cfg.pool_weights != "raw":
            kinds["w_pool"] = self.pool_weights(w)
        names = self.embedding.modalities
        return {
            f"{kind}_{m}": (weights[:, k] * real).sum() / n_real
            for kind, weights in kinds.items()
            for k, m in enumerate(names)
        }

    @torch.no_grad()
    def adversarial_diagnostics(self, states: ItemStates, parts: ItemParts) -> dict[str, torch.Tensor]:
        """What the weighted losses hide (Figure 6a): D1's unweighted cross-entropy and accuracy on its input
        c^m, D0's and Ds' accuracy, and per modality the mean w^m raw (``w_raw_*``), over the batch mean
        (``w_norm_*``, as D1's loss uses them by default) and as the max-pool uses them (``w_pool_*``,
        per-item weights only). Scalars over the non-padding items; {} without DDMA/ADV."""
        if self.variant.adversarial == "none" or parts.adv_input is None:
            return {}
        real = states.items != PAD
        logits = self.d1(parts.adv_input[real])
        out = {"d1_ce": self._modality_ce(logits), "d1_acc": self._modality_accuracy(logits)}
        if self.variant.adversarial == "adv":
            return out  # w = 1
        out["d0_acc"] = self._modality_accuracy(parts.d0_logits[real])
        out["ds_acc"] = self._modality_accuracy(self.ds_discriminator(parts.ds_input[real]))
        w = parts.w[real]  # (U', M)
        kinds = {"w_raw": w, "w_norm": _over_batch_mean(w)}
        if self.cfg.pool_weights != "raw":
            kinds["w_pool"] = self.pool_weights(w)
        for kind, weights in kinds.items():
            out |= {f"{kind}_{m}": weights[:, k].mean() for k, m in enumerate(self.embedding.modalities)}
        return out

    def represent(self, states: ItemStates) -> torch.Tensor:
        """U item states -> rep (U, D)."""
        return self.decompose(states).rep

    # rep as a time-invariant part and the statistics' part (serving, paper 4.9.2). s is a sum over
    # modalities of terms that each depend on one modality (atten^m depends on s^m alone), and c a max over
    # w^m c^m (w^m depends on c^m alone), so rep = (s_rest + t_stats) + max(c_rest, w^stats c^stats)
    # exactly. Per-item pool weights only rescale that max by M / sum_m w^m, a positive factor per item, so
    # the static part then also carries sum_rest w^m. Registration precomputes the static part per item; a
    # request adds its items' current statistics, so a served rep never holds a stale count.

    def static_parts(self, items: torch.Tensor) -> torch.Tensor:
        """(U,) item codes -> (U, 2D) [s_rest; c_rest] over every modality but the statistics, with
        ``pool_weights="per_item"`` (U, 2D + 1) [s_rest; c_rest; sum_rest w^m] (c_rest of the raw w^m)."""
        rest = [k for k, m in enumerate(self.embedding.modalities) if m != "stats"]
        no_stats = ItemStates(items, torch.zeros(len(items), 0, 0, dtype=torch.int16, device=items.device))
        e = self.embedding(no_stats, [self.embedding.modalities[k] for k in rest])  # (U, M', D_e)
        terms, weighted, w = self._modality_terms(e, rest)  # (U, M', D), (U, M', D), (U, M')
        s = terms.sum(1)  # (U, D)
        c = weighted.amax(1) if weighted is not None else torch.zeros_like(s)  # (U, D)
        if w is not None and self.cfg.pool_weights == "per_item":
            return torch.cat([s, c, w.sum(1, keepdim=True)], dim=1)
        return torch.cat([s, c], dim=1)

    def represent_from_static(self, static: torch.Tensor, states: ItemStates) -> torch.Tensor:
        """:meth:`static_parts` (U, 2D or 2D + 1) and the U states (their stats codes) -> rep (U, D); equals
        :meth:`represent` up to float rounding."""
        d = self.cfg.rep_dim
        per_item = self.variant.adversarial != "none" and self.cfg.pool_weights == "per_item"
        width = 2 * d + int(per_item)
        if static.shape[1] != width:
            raise ValueError(f"static parts of width {static.shape[1]}; this model's are {width}")
        s, c, w_sum = static[:, :d], static[:, d : 2 * d], static[:, 2 * d :]  # (U, D), (U, D), (U, 0 or 1)
        if "stats" in self.embedding.modalities:
            index = self.embedding.modalities.index("stats")
            terms, weighted, w = self._modality_terms(self.embedding(states, ["stats"]), [index])
            s = s + terms[:, 0]
            if weighted is not None:
                c = torch.maximum(c, weighted[:, 0])
                w_sum = w_sum + w
        if self.variant.adversarial == "none":
            return s
        return s + (c * self._per_item_scale(w_sum) if per_item else c)

    def _modality_terms(
        self, e: torch.Tensor, index: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """e (U, K, D_e) of the modalities at ``index`` -> their fusion terms (U, K, D) (atten^m s^m, or s^m
        for CONC), w^m c^m (U, K, D) and w^m (U, K) (both None without an adversarial branch), as
        :meth:`decompose`."""
        parts = self._parts(e, index)
        terms = parts["specific"] if parts["atten"] is None else parts["atten"] * parts["specific"]
        if parts["invariant"] is None:
            return terms, None, None
        return terms, parts["w"][..., None] * parts["invariant"], parts["w"]

    def _d1_loss(self, adv_input: torch.Tensor, w: torch.Tensor, extractor_scale: float) -> torch.Tensor:
        """Eq. 7 through a gradient reversal layer: D1 learns to tell modalities apart, I to confuse it."""
        weights = self.d1_weights(w)  # (U', M)
        if self.d1_weighting == "input":
            return self._modality_ce(self.d1(grad_reverse(weights[..., None] * adv_input, extractor_scale)))
        logits = self.d1(grad_reverse(adv_input, extractor_scale))  # (U', M, M)
        return self._modality_ce(logits, weights=weights)

    def _modality_accuracy(self, logits: torch.Tensor) -> torch.Tensor:
        """Share of the M-way modality logits (U', M, M) whose argmax is the slot's own modality."""
        hits = logits.argmax(-1) == self.modality_labels  # (U', M)
        return hits.float().mean()

    def _modality_ce(self, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of M-way modality logits (U', M, M) against each slot's own modality."""
        if logits.shape[0] == 0:
            return logits.sum()  # zero, but still attached to the graph
        labels = self.modality_labels.expand(logits.shape[0], -1)  # (U', M)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        if weights is not None:
            ce = ce * weights
        return ce.mean()

    # -- the CTR network ---------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        batch = recent_window(batch)  # the recurrent loop costs per step: skip all-padding columns
        unique, inverse = batch_items(batch)
        parts = self.factor(unique)
        weight = adversarial_weight(progress, self.cfg.lambda0, self.cfg.gamma)
        as_reversal = self.cfg.lambda_role == "reversal"  # lambda scales the extractors' share only
        losses, diagnostics = {}, {}
        if self.training:
            losses, diagnostics = self.adversary(unique, parts, weight if as_reversal else 1.0)
        candidate, user = encode_histories(batch, inverse, parts.rep, self._user)  # (B, D), (B, H)
        logits = self.predict(torch.cat([user, candidate], dim=1)).squeeze(-1)  # (B,)
        if not losses:
            return ModelOutput(logits)
        aux = {name: loss.detach() for name, loss in losses.items()} | diagnostics
        total = sum(losses.values())
        return ModelOutput(logits, aux_loss=total if as_reversal else weight * total, aux=aux)

    def _user(self, bucket: HistoryBucket) -> torch.Tensor:
        """User vectors (B_b, H) of one length bucket of distinct histories: APGRU + candidate attention,
        or (BaseModel) a plain GRU's last state."""
        if self.variant.sequence == "gru":
            states = run_gru(self.sequence, bucket.reps, bucket.lengths)  # (K_b, L_b, H)
            return take_rows(last_state(states, bucket.lengths), bucket.which)  # (B_b, H)
        props = self.behavior(bucket.column("hist_behavior"), bucket.column("hist_gap"))  # (K_b, L_b, P)
        return self.sequence(bucket.reps, props, bucket.mask, bucket.candidate, bucket.which)  # (B_b, H)

    # -- serving (paper 4.9.2) -----------------------------------------------------------------------------

    @torch.no_grad()
    def score_from_representations(
        self,
        history: torch.Tensor,
        behavior: torch.Tensor,
        gap: torch.Tensor,
        hist_len: torch.Tensor,
        candidates: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """Click logits from precomputed item representations: only APGRU, attention and prediction run.

        R users, each with C_r candidates (N = sum C_r): history reps (R, L, D), behavior and gap codes
        (R, L), hist_len (R,), candidate reps (N, D) grouped by user in order, counts (R,) = C_r. The GRU
        runs once per user, not once per candidate; the result equals ``forward`` on the expanded batch.
        """
        if self.variant.sequence != "apgru":
            raise ValueError(f"served scoring needs the APGRU variant, not {self.variant}")
        steps = max(int(hist_len.max()), 1) if len(hist_len) else 1  # as recent_window: skip padding columns
        history, behavior, gap = history[:, :steps], behavior[:, :steps], gap[:, :steps]
        mask = sequence_mask(hist_len, steps)  # (R, L')
        states = self.sequence.fused_states(history, self.behavior(behavior, gap), mask)  # (R, L', H)
        rows = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (N,) each candidate's user
        user = self.sequence.attend(states[rows], mask[rows], candidates)  # (N, H)
        return self.predict(torch.cat([user, candidates], dim=1)).squeeze(-1)  # (N,)
