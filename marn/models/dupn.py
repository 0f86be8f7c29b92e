"""DUPN: Deep User Perception Network (Ni, Ou, Liu, Li, Ou, Zeng, Si; KDD 2018), as a CTR model.

"Perceive Your Users in Depth: Learning Universal User Representations from Multiple E-commerce Tasks".
The network, top to bottom:

    items --ItemModalities--> e^m, concatenated: item vector e       (U, E)       DUPN: item embedding
    hist_behavior, hist_gap --BehaviorProperty--> p_t                (B, L, P)    DUPN: property embedding
    property gated LSTM over (e_t, p_t)                              (B, L, H)    DUPN: property gated LSTM
        i_t, f_t, o_t = sigmoid(W x_t + U h_{t-1} + V p_t + b)       p_t only opens and closes the gates;
        c_t = f_t c_{t-1} + i_t tanh(W_c x_t + U_c h_{t-1} + b_c)    it never writes into the memory
        h_t = o_t tanh(c_t)
    a_t = masked softmax_t MLP([h_t, p_t, q]), q = the candidate's e  (B, L)       DUPN: attention net
    user = sum_t a_t h_t                                              (B, H)
    logit = MLP([user, q])                                            (B,)         DUPN: the CTR task

Notation: B batch, L history, U distinct items in the batch, M modalities, D = modality_dim, E = M * D,
P behaviour-property width, H = sequence_dim, A attention width.

Where we depart from the paper, and why:
- One task. DUPN learns a user representation shared by CTR, learning-to-rank, price-preference and
  fashion-icon heads trained jointly; the MARN paper compares it on CTR alone, so only the CTR head is
  built. The multi-task transfer that motivates DUPN is therefore not reproduced here.
- Query. DUPN's attention net scores each behaviour against the search query and the user profile. Our
  samples have neither; in the CTR setting the candidate item takes the query's place. The scorer is a
  feed-forward net over [h_t, p_t, q] with ReLU hidden layers of ``cfg.attention_hidden`` (an MLP, not a
  bilinear form), normalised by a softmax over the real behaviours.
- Features. Items are MARN's modalities (IDs: item, category, brand, shop; image; title CNN; statistics),
  each projected by ItemModalities and concatenated, standing in for DUPN's item ID, shop, brand, category
  and tag embeddings (the MARN paper feeds every neural model MARN's features). The property is behaviour
  type and time-gap bucket; DUPN's scenario and time-of-day fields do not exist in our data.
- Sizes. The prediction MLP is ``cfg.hidden`` and the LSTM width ``cfg.sequence_dim`` for every model
  (MARN paper 4.1), not DUPN's own. No peephole terms; the forget-gate bias starts at 1 (see __init__).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import (
    MLP,
    MODALITIES,
    BehaviorProperty,
    HistoryBucket,
    ItemModalities,
    ItemStates,
    batch_items,
    distinct_histories,
    distinct_states,
    encode_histories,
    masked_softmax,
    packing_pays,
    recent_window,
    sequence_mask,
    take_rows,
)


class PropertyGatedLSTM(nn.Module):
    """DUPN's property gated LSTM: the input, forget and output gates also read the behaviour property p_t.

    ``(B, L, E), (B, L, P) -> (B, L, H)``, from a zero state. Gate rows are ordered i, f, o, g (g the cell
    candidate), so the property's projection V covers the first 3H rows and has no row for g.
    """

    def __init__(self, input_dim: int, property_dim: int, hidden: int, forget_bias: float = 1.0):
        super().__init__()
        self.input = nn.Linear(input_dim, 4 * hidden)  # W and b, rows i, f, o, g
        self.property = nn.Linear(property_dim, 3 * hidden, bias=False)  # V, rows i, f, o: never g
        self.recurrent = nn.Linear(hidden, 4 * hidden, bias=False)  # U, rows i, f, o, g
        with torch.no_grad():
            self.input.bias[hidden : 2 * hidden].fill_(forget_bias)
        self.hidden = hidden

    def forward(self, items: torch.Tensor, props: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L, E), (B, L, P), (B,) real lengths of left-aligned histories -> (B, L, H), 0 past each length.

        One ATen LSTM call: the property enters i, f and o, so this is a
        standard LSTM over [x_t; p_t] whose g rows are 0 on p_t (PyTorch orders the gates i, f, g, o).
        Equal to :meth:`reference` on every real step."""
        h_dim = self.hidden
        weight = torch.cat([self.input.weight, F.pad(self.property.weight, (0, 0, 0, h_dim))], dim=1)

        def torch_order(rows: torch.Tensor) -> torch.Tensor:  # ours i, f, o, g -> PyTorch's i, f, g, o
            i_f, o, g = rows[: 2 * h_dim], rows[2 * h_dim : 3 * h_dim], rows[3 * h_dim :]
            return torch.cat([i_f, g, o])

        params = [
            torch_order(weight),
            torch_order(self.recurrent.weight),
            torch_order(self.input.bias),
            self.input.bias.new_zeros(4 * h_dim),
        ]
        x = torch.cat([items, props], dim=-1)  # (B, L, E + P)
        zeros = x.new_zeros(1, x.shape[0], h_dim)
        if packing_pays(lengths, x.shape[1]):  # real behaviours only
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
            )
            zeros = zeros[:, packed.sorted_indices]
            data, _, _ = torch.lstm(
                packed.data, packed.batch_sizes, [zeros, zeros], params, True, 1, 0.0, self.training, False
            )
            states, _ = nn.utils.rnn.pad_packed_sequence(
                packed._replace(data=data), batch_first=True, total_length=x.shape[1]
            )
        else:  # padding steps run after the real ones and change none of them
            states, _, _ = torch.lstm(x, [zeros, zeros], params, True, 1, 0.0, self.training, False, True)
        real = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, L)
        return states * real[..., None].to(states.dtype)  # (B, L, H)

    def reference(self, items: torch.Tensor, props: torch.Tensor) -> torch.Tensor:
        """The paper's equations step by step, over every column (the tests hold ``forward`` to it)."""
        h_dim = self.hidden
        # W x_t + V p_t + b for every step in one matmul: [W | V] with V zero-padded on the g rows.
        weight = torch.cat([self.input.weight, F.pad(self.property.weight, (0, 0, 0, h_dim))], dim=1)
        inputs = torch.cat([items, props], dim=-1).transpose(0, 1)  # (L, B, E + P), time-major
        x = F.linear(inputs, weight, self.input.bias)  # (L, B, 4H), each step's slice contiguous
        recurrent = self.recurrent.weight.t()  # (H, 4H)
        h = c = x.new_zeros(x.shape[1], h_dim)  # (B, H)
        states = []
        for x_t in x:
            z = torch.addmm(x_t, h, recurrent)  # (B, 4H)
            i, f, o = torch.sigmoid(z[:, : 3 * h_dim]).chunk(3, dim=1)  # each (B, H)
            c = f * c + i * torch.tanh(z[:, 3 * h_dim :])
            h = o * torch.tanh(c)
            states.append(h)
        return torch.stack(states, dim=1)  # (B, L, H)


class BehaviorAttention(nn.Module):
    """DUPN's attention net with the candidate as the query: a_t = masked softmax_t MLP([h_t, p_t, q]).

    The first layer is split into a per-step part on [h_t, p_t] and a per-row part on q: the same MLP as
    on the concatenation, without repeating the wide item vector q L times.
    """

    def __init__(self, state_dim: int, property_dim: int, query_dim: int, hidden: Sequence[int]):
        super().__init__()
        if not hidden:
            raise ValueError("DUPN's attention needs at least one hidden layer (cfg.attention_hidden)")
        self.keys = nn.Linear(state_dim + property_dim, hidden[0])
        self.query = nn.Linear(query_dim, hidden[0], bias=False)
        self.score = MLP(hidden[0], hidden[1:], out_dim=1)

    def forward(
        self,
        states: torch.Tensor,
        props: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        which: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """States (K, L, H), props (K, L, P) and mask (K, L) of K histories, queries (B, E) and ``which``
        (B,), each query's history (None: K = B) -> (B, L) weights, 0 on padding."""
        keys = self.keys(torch.cat([states, props], dim=-1))  # (K, L, A), once per distinct history
        if which is not None:
            keys, mask = take_rows(keys, which), take_rows(mask, which)  # (B, L, ...)
        first = torch.relu(keys + self.query(query)[:, None, :])  # (B, L, A)
        return masked_softmax(self.score(first).squeeze(-1), mask)  # (B, L), 0 on padding


class DUPN(CTRModel):
    def __init__(
        self,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        forget_bias: float = 1.0,  # TF LSTMCell's default (Jozefowicz et al. 2015); DUPN gives no value
    ):
        super().__init__(catalog, features, cfg)
        self.embedding = ItemModalities(
            catalog, features, cfg, MODALITIES
        )  # MARN's features, see the module docstring
        item_dim = self.embedding.n_modalities * self.embedding.dim  # E
        self.behavior = BehaviorProperty(cfg)
        self.lstm = PropertyGatedLSTM(item_dim, self.behavior.dim, cfg.sequence_dim, forget_bias)
        self.attention = BehaviorAttention(
            cfg.sequence_dim, self.behavior.dim, item_dim, cfg.attention_hidden
        )
        self.predict = MLP(cfg.sequence_dim + item_dim, cfg.hidden, out_dim=1, dropout=cfg.dropout)

    def perceive(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The candidate's item vector (B, E), the hidden states h_t (B, L', H) and the attention a_t
        (B, L'), where L' <= L is the batch's longest history; states and weights are 0 on padding."""
        batch = recent_window(batch)
        unique, inverse = batch_items(batch)
        vectors = self.embedding(unique).flatten(1)  # (U, M, D) -> (U, E)
        candidate = take_rows(vectors, inverse[:, 0])  # (B, E)
        rows, which = distinct_histories(batch, inverse)  # (K,), (B,): a positive and its negative share one
        history = take_rows(vectors, inverse[rows, 1:])  # (K, L', E)
        lengths = batch["hist_len"][rows]  # (K,)
        mask = sequence_mask(lengths, history.shape[1])  # (K, L')
        props = self.behavior(batch["hist_behavior"][rows], batch["hist_gap"][rows])  # (K, L', P)
        # Histories are left-aligned, so real steps never see padding; the mask only cleans the tail.
        states = self.lstm(history, props, lengths)  # (K, L', H), 0 on padding
        weights = self.attention(states, props, candidate, mask, which)  # (B, L')
        return candidate, take_rows(states, which), weights

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        batch = recent_window(batch)
        unique, inverse = batch_items(batch)
        vectors = self.embedding(unique).flatten(1)  # (U, M, D) -> (U, E)
        candidate, user = encode_histories(batch, inverse, vectors, self._user)  # (B, E), (B, H)
        return ModelOutput(self.predict(torch.cat([user, candidate], dim=1)).squeeze(-1))  # (B,)

    def _user(self, bucket: HistoryBucket) -> torch.Tensor:
        """One length bucket of distinct histories -> the user vectors (B_b, H) of its candidates; as
        :meth:`perceive`, which keeps every intermediate."""
        props = self.behavior(bucket.column("hist_behavior"), bucket.column("hist_gap"))  # (K_b, L_b, P)
        states = self.lstm(bucket.reps, props, bucket.lengths)  # (K_b, L_b, H), 0 on padding
        weights = self.attention(states, props, bucket.candidate, bucket.mask, bucket.which)  # (B_b, L_b)
        return torch.einsum("bl,blh->bh", weights, take_rows(states, bucket.which))  # (B_b, H); 0 if empty

    @torch.no_grad()
    def score_users(
        self, histories: dict[str, torch.Tensor], candidates: ItemStates, counts: torch.Tensor
    ) -> torch.Tensor:
        """Serving: R users' histories (hist_items, hist_behavior, hist_gap (R, L), hist_stats (R, L, F, G),
        hist_len (R,)) and N candidate states grouped by user (counts (R,) = C_r) -> logits (N,). The LSTM
        runs once per user rather than once per candidate; the result equals ``forward`` on the batch
        expanded to N rows."""
        histories = recent_window(histories)
        n, (r, steps) = len(candidates), histories["hist_items"].shape
        unique, inverse = distinct_states(
            torch.cat([candidates.items, histories["hist_items"].flatten()]),
            torch.cat([candidates.stats, histories["hist_stats"].flatten(0, 1)]),
        )
        vectors = self.embedding(unique).flatten(1)  # (U, E)
        candidate = vectors[inverse[:n]]  # (N, E)
        history = vectors[inverse[n:]].view(r, steps, -1)  # (R, L', E)
        mask = sequence_mask(histories["hist_len"], steps)  # (R, L')
        props = self.behavior(histories["hist_behavior"], histories["hist_gap"])  # (R, L', P)
        states = self.lstm(history, props, histories["hist_len"])  # (R, L', H), 0 on padding
        rows = torch.repeat_interleave(torch.arange(r), counts)  # (N,) each candidate's user
        weights = self.attention(states, props, candidate, mask, rows)  # (N, L'), keys once per user
        user = torch.einsum("nl,nlh->nh", weights, take_rows(states, rows))  # (N, H)
        return self.predict(torch.cat([user, candidate], dim=1)).squeeze(-1)  # (N,)
