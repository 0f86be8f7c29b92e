"""COURIER: poster vectors pre-trained on click behaviour (Yang et al., "COURIER: Contrastive User Intention
Reconstruction for Large-Scale Visual Recommendation", Front. Comput. Sci. 2025; ../shared/paper/courier.md).

    summary = train_courier(data_dir, train_rows, valid_rows, cfg.embed.courier)

reads the embed stage's ``image_embeddings.parquet`` (the frozen backbone's poster vectors), trains a head on
the training split's clicks and writes, beside it,

- ``courier_embeddings.parquet``: the IMAGE_EMBEDDINGS columns (item_id, embedding list<float32> of
  ``dim``, content_hash, backbone ``courier-<backbone identity>``) for every item with a poster vector,
  whether or not it was clicked in training: the head maps a poster alone, so it needs no events;
- ``courier_head.pt``: the trained head (``CourierHead.to_state``), written before the table. A model
  trained on the table keeps it (``ItemFeatures.image_head``), so serving maps a new item's backbone vector
  from Feast into the same space (:func:`read_courier_head` checks that head and table agree);
- ``courier_metrics.json``: validation recall@k of the next click ranked by the learned space, against
  the same ranking in the raw backbone space, in its PCA to ``dim`` and by training popularity; the
  epochs, timings and settings.

The method, as far as the paper's abstract fixes it [A] and as we reconstructed the rest (unverified):

- [A] an image encoder pre-trained on users' click histories; a user-intention reconstruction module
  rebuilds the current item from the images of the user's earlier clicks; a contrastive loss learns that
  intention and keeps the embeddings from collapsing; the ranker receives the fixed embeddings.
- ours: the encoder is a head only (tier A of the note): standardised backbone vector -> Linear(hidden) ->
  GELU -> Linear(dim) -> L2-normalised; the backbone stays frozen and is not re-run.
- ours (the note's working formulation): per candidate i, attention with i as the query over the history
  keys, a_ij = softmax_j(e_i . e_hj / tau_attention), r_i = sum_j a_ij e_hj; score s_i = cos(r_i, e_i);
  InfoNCE over the candidates at temperature tau. s_i is computed without forming r_i: r_i . e_i is the
  attention-weighted mean of the dots already computed, |r_i|^2 = a_i^T (H H^T) a_i.
- ours: each example's candidates are its target and ``negatives`` items drawn uniformly from the posters,
  the same draw for the whole batch (MovieLens has no impressions; the cost per example grows with the
  negatives, not the batch); a negative that is the target or among the user's earlier clicks (every
  training-split click of theirs stamped before the example's, and its history) is masked out as a false
  negative, as the note's plan says. The paper's negatives were not retrieved.
- ours: keys are the newest ``history`` earlier clicks that have a poster, other than the target itself (a
  repeat click would reconstruct the target from itself: a free hit on multi-behaviour data); clicks with
  fewer than ``min_history`` such keys are skipped.
- ours: AdamW, early stopping on validation recall@k; standardisation by the catalogue's poster vectors'
  mean and spread (no events involved; a spread below a tenth of the median channel's is floored there, so
  a channel that never varies in the catalogue cannot dominate a new poster's vector).
- ours: recall@k ranks the target among every item with a poster, the user's earlier clicks left out; an
  item that ties with the target counts as the expected hit under random tie-breaking (a collapsed space
  scores about k / N, not 1), and a target scored NaN is a miss.

Leak-freedom: training examples are the training split's positives (the DIN protocol of
:mod:`marn.data.samples`: each user's clicks before their validation click, each with its strictly earlier
history); validation positives only choose the epoch. The split is per user, not at one calendar time: a
user's validation and test clicks, and users too short for the protocol, change nothing here (with a seed
and one torch thread the table is bit-identical, tests/unit/test_courier.py), but a new user's training
clicks count even when they come after another user's test click, as they do for every model here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from marn.config import CourierConfig
from marn.data.files import write_atomic, write_parquet_atomic, write_text_atomic
from marn.data.schema import COURIER_EMBEDDINGS, COURIER_HEAD, IMAGE_EMBEDDINGS
from marn.embed.cache import list_column

log = logging.getLogger(__name__)

COURIER_METRICS = "courier_metrics.json"
SAMPLE_COLUMNS = ("user_id", "ts", "label", "item_id", "hist_item_ids")  # of the DIN sample splits
HEAD_CHECK_ITEMS = 64  # posters the head re-maps to prove it wrote the table beside it
HEAD_CHECK_ATOL = 1e-5  # on L2-normalised vectors; a foreign head or backbone differs by far more
EVAL_CELLS = 4_000_000  # (clicks x catalogue x history) similarities held at once while ranking
STD_FLOOR = 0.1  # of the median channel spread: the least spread a channel is standardised by

# progress(phase, done, total): phase "epoch <k>", counting training steps (marn.progress.phase_bars)
ProgressHook = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Posters:
    """The backbone's vectors of the items that have a poster, sorted by item_id."""

    item_ids: np.ndarray  # (N,) str
    vectors: np.ndarray  # (N, D) float32
    content_hashes: list[str]
    backbone: str  # the embed stage's cache identity

    def codes(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each item id, -1 for an item without a poster vector."""
        return pd.Index(self.item_ids).get_indexer(np.asarray(item_ids, dtype=object))


@dataclass(frozen=True)
class UserClicks:
    """The training split's clicks on items with a poster, per user in time order: an example's "earlier
    clicks" (false negatives, left out of its ranking) are its user's clicks here stamped before it."""

    users: pd.Index  # user ids
    starts: np.ndarray  # (U + 1,) user u's clicks are [starts[u], starts[u + 1])
    ts: np.ndarray  # (E,) int64 nanoseconds, ascending within a user
    items: np.ndarray  # (E,) poster rows

    @classmethod
    def from_rows(cls, rows: pa.Table, posters: Posters) -> UserClicks:
        _check_columns(rows)
        positives = rows.filter(pc.equal(rows.column("label"), 1))
        frame = pd.DataFrame(
            {
                "user": positives.column("user_id").to_numpy(zero_copy_only=False).astype(str),
                "ts": positives.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False),
                "item": posters.codes(positives.column("item_id").to_numpy(zero_copy_only=False)),
            }
        )
        frame = frame[frame["item"] >= 0].sort_values(["user", "ts"], kind="stable")
        owners = frame["user"].to_numpy()
        first = np.r_[True, owners[1:] != owners[:-1]] if len(owners) else np.zeros(0, bool)
        starts = np.r_[np.flatnonzero(first), len(owners)].astype(np.int64)
        return cls(
            pd.Index(owners[first]), starts, frame["ts"].to_numpy(np.int64), frame["item"].to_numpy(np.int64)
        )

    def before(self, user_ids: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, count) per example: its user's clicks stamped strictly before ``ts`` (none for a user
        with no training click). One binary search for all: clicks keyed by (user, rank of their time)."""
        user = self.users.get_indexer(np.asarray(user_ids).astype(str))
        known = user >= 0
        times = np.unique(np.r_[self.ts, ts])
        width = len(times) + 1
        owner = np.repeat(np.arange(len(self.users)), np.diff(self.starts))
        keys = owner * width + np.searchsorted(times, self.ts)  # ascending: sorted by user, then time
        wanted = np.maximum(user, 0) * width + np.searchsorted(times, ts)
        start = self.starts[np.maximum(user, 0)]
        count = np.where(known, np.searchsorted(keys, wanted, side="left") - start, 0)
        return np.where(known, start, 0).astype(np.int64), count.astype(np.int64)


@dataclass(frozen=True)
class Clicks:
    """Next-click examples: target row and up to L history rows (-1 = padding) per example, and each
    example's earlier clicks: ``earlier_items[earlier_start[i] : earlier_start[i] + earlier_count[i]]``."""

    targets: np.ndarray  # (n,) int64
    history: np.ndarray  # (n, L) int64
    earlier_items: np.ndarray  # (E,) poster rows, shared by the examples (UserClicks.items)
    earlier_start: np.ndarray  # (n,) int64
    earlier_count: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, index: np.ndarray | slice) -> Clicks:
        """The examples at ``index`` (their earlier clicks still point into the shared array)."""
        return Clicks(
            self.targets[index],
            self.history[index],
            self.earlier_items,
            self.earlier_start[index],
            self.earlier_count[index],
        )

    def earlier_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(example, poster row) of every earlier click: the history keys and the user's earlier clicks."""
        rows, slots = np.nonzero(self.history >= 0)
        total = int(self.earlier_count.sum())
        owner = np.repeat(np.arange(len(self)), self.earlier_count)
        offset = np.arange(total) - np.repeat(
            np.cumsum(self.earlier_count) - self.earlier_count, self.earlier_count
        )
        items = self.earlier_items[self.earlier_start[owner] + offset] if total else np.zeros(0, np.int64)
        return np.r_[rows, owner].astype(np.int64), np.r_[self.history[rows, slots], items].astype(np.int64)


@dataclass(frozen=True)
class CourierSummary:
    items: int  # rows written: items with a poster vector
    dim: int
    train_examples: int
    valid_examples: int
    epochs: int  # epochs run (early stopping included)
    best_epoch: int  # 1-based; the head written is this epoch's
    recall: dict[str, float | None]  # validation recall@k: courier, imagenet, imagenet_pca, popularity
    recall_k: int
    seconds: float  # the whole stage, wall clock
    cpu_seconds: float  # the whole stage, this process's CPU time (all threads): comparable on a busy machine
    train_seconds: float  # training steps only
    steps_per_s: float
    examples_per_s: float
    table_path: Path
    metrics_path: Path


def read_posters(data_dir: Path) -> Posters:
    path = Path(data_dir) / IMAGE_EMBEDDINGS
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: COURIER trains over the embed stage's vectors; run it first"
        )
    table = pq.read_table(path, columns=["item_id", "embedding", "content_hash", "backbone"])
    if table.num_rows < 2:
        raise ValueError(
            f"{path}: COURIER needs at least two items with a poster vector, got {table.num_rows}"
        )
    table = table.set_column(0, "item_id", table.column("item_id").cast(pa.string())).sort_by("item_id")
    embedding = table.column("embedding").combine_chunks()
    lengths = pc.list_value_length(embedding).to_numpy(zero_copy_only=False)
    if embedding.null_count or len(set(lengths.tolist())) != 1:
        raise ValueError(f"{path}: every embedding must be a list of one length, without nulls")
    vectors = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(lengths), -1)
    if not np.isfinite(vectors).all():
        raise ValueError(f"{path}: embeddings hold NaN or infinite values")
    item_ids = np.asarray(table.column("item_id").cast(pa.string()).to_pylist(), dtype=object)  # ids are text
    if len(pd.unique(item_ids)) != len(item_ids):
        raise ValueError(f"{path}: item_id is not unique")
    backbones = pc.unique(table.column("backbone")).to_pylist()
    if len(backbones) != 1:  # vectors of two networks are two spaces: one head cannot read both
        raise ValueError(f"{path}: the vectors come from {len(backbones)} backbones {backbones}; re-embed")
    return Posters(item_ids, vectors, table.column("content_hash").to_pylist(), str(backbones[0]))


def read_sample_rows(samples_dir: str | Path, split: str) -> pa.Table:
    """The columns COURIER reads from a split written by :func:`marn.data.samples.write_samples`."""
    path = Path(samples_dir) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the features stage first")
    return pq.read_table(path, columns=list(SAMPLE_COLUMNS))


def _check_columns(rows: pa.Table) -> None:
    for column in SAMPLE_COLUMNS:
        if column not in rows.column_names:
            raise ValueError(f"sample rows lack the column {column!r}")


def click_examples(
    rows: pa.Table, posters: Posters, history: int, min_history: int, earlier: UserClicks | None = None
) -> Clicks:
    """Positives of a sample split (label 1) whose target has a poster and whose history holds at least
    ``min_history`` earlier clicks with one, the target itself not counted; keys are the newest ``history``
    of those, in sample order. ``earlier``: the training split's clicks per user, whose clicks before each
    example are left out of its ranking (None: only its history keys)."""
    _check_columns(rows)
    positives = rows.filter(pc.equal(rows.column("label"), 1))
    targets = posters.codes(positives.column("item_id").to_numpy(zero_copy_only=False))
    lists = positives.column("hist_item_ids").combine_chunks()
    if lists.null_count:
        raise ValueError(f"hist_item_ids is null in {lists.null_count} sample rows; an empty history is []")
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = (
        posters.codes(lists.flatten().to_numpy(zero_copy_only=False)) if lengths.sum() else np.zeros(0, int)
    )
    owner = np.repeat(np.arange(len(lengths)), lengths)
    key = (flat >= 0) & (flat != targets[owner])  # no poster: no key; the target is no key of its own
    owner, flat = owner[key], flat[key]
    counts = np.bincount(owner, minlength=len(lengths))
    keep = (targets >= 0) & (counts >= min_history)
    first = np.r_[0, np.cumsum(counts)[:-1]]
    position = np.arange(len(owner)) - first[owner]  # 0 = oldest key of the example
    skipped = np.maximum(counts - history, 0)  # older keys beyond the window
    newest = position >= skipped[owner]
    matrix = np.full((len(lengths), history), -1, dtype=np.int64)
    matrix[owner[newest], (position - skipped[owner])[newest]] = flat[newest]
    kept = positives.filter(pa.array(keep))
    if earlier is None:
        items, start, count = (
            np.zeros(0, np.int64),
            np.zeros(int(keep.sum()), np.int64),
            np.zeros(int(keep.sum()), np.int64),
        )
    else:
        items = earlier.items
        start, count = earlier.before(
            kept.column("user_id").to_numpy(zero_copy_only=False),
            kept.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False),
        )
    return Clicks(targets[keep].astype(np.int64), matrix[keep], items, start, count)


class CourierHead(nn.Module):
    """Standardised poster vector -> hidden (GELU) -> dim, L2-normalised: the trained part of COURIER."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, hidden: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("scale", torch.from_numpy(scale))
        self.net = nn.Sequential(nn.Linear(len(mean), hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D_backbone) poster vectors -> (N, dim) unit vectors."""
        return nn.functional.normalize(self.net((vectors - self.mean) / self.scale), dim=-1)

    @property
    def in_dim(self) -> int:
        return len(self.mean)

    def to_state(self, backbone: str) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)``); ``backbone``: the embed
        stage's identity of the vectors it reads."""
        hidden, dim = self.net[0].out_features, self.net[2].out_features
        return {"weights": dict(self.state_dict()), "hidden": hidden, "dim": dim, "backbone": backbone}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CourierHead:
        weights = state["weights"]
        head = cls(weights["mean"].numpy(), weights["scale"].numpy(), int(state["hidden"]), int(state["dim"]))
        head.load_state_dict(weights)
        return head.eval()


def read_courier_head(data_dir: str | Path) -> dict[str, Any]:
    """``courier_head.pt`` of ``data_dir`` (its ``CourierHead.to_state``), checked against the tables beside
    it: the head must map the backbone's vectors of ``image_embeddings.parquet`` to the rows of
    ``courier_embeddings.parquet``. A head of another run, or a backbone re-embedded since, is refused."""
    data_dir = Path(data_dir)
    path = data_dir / COURIER_HEAD
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the courier table has no head beside it (written by an older version, or "
            "copied alone); run the courier stage (marn courier) again"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = CourierHead.from_state(state)
    except Exception as err:  # a truncated, foreign or hand-made file: say which, not a bare KeyError
        raise ValueError(
            f"{path} is not a COURIER head ({type(err).__name__}: {err}); rerun marn courier"
        ) from err
    posters = read_posters(data_dir)
    table = pq.read_table(
        data_dir / COURIER_EMBEDDINGS, columns=["item_id", "embedding", "content_hash", "backbone"]
    )
    ids = np.asarray(table.column("item_id").cast(pa.string()).to_pylist(), dtype=object)
    rows = posters.codes(ids)
    take = np.flatnonzero(rows >= 0)[:HEAD_CHECK_ITEMS]
    problem = None
    # the table must be of today's posters: the items re-embedded since (new, or a changed poster) would
    # otherwise get a zero vector, or keep their old poster's
    stale = set(zip(ids, table.column("content_hash").to_pylist(), strict=True)) != set(
        zip(posters.item_ids, posters.content_hashes, strict=True)
    )
    if stale:
        problem = (
            "the backbone's posters changed since the table was written (items or content hashes differ)"
        )
    elif set(table.column("backbone").to_pylist()) != {f"courier-{posters.backbone}"}:
        problem = f"the table was not made from the backbone {posters.backbone!r}"
    elif state["backbone"] != posters.backbone:
        problem = f"its backbone {state['backbone']!r} is not the embed stage's {posters.backbone!r}"
    elif head.in_dim != posters.vectors.shape[1]:
        problem = f"it reads {head.in_dim}-d vectors, the embed stage wrote {posters.vectors.shape[1]}-d"
    elif len(take) == 0:
        problem = "no item of the courier table has a backbone vector"
    else:
        stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)[take]).astype(np.float32)
        with torch.no_grad():
            mapped = head(torch.from_numpy(posters.vectors[rows[take]])).numpy()
        if stored.shape != mapped.shape or not np.allclose(mapped, stored, atol=HEAD_CHECK_ATOL, rtol=0):
            problem = "it does not map the backbone's vectors to the table's rows"
    if problem:
        table = data_dir / COURIER_EMBEDDINGS
        raise ValueError(
            f"{path} is not the head of {table}: {problem}; rerun the courier stage (marn courier)"
        )
    return state


def reconstruction_scores(
    dots: torch.Tensor, gram: torch.Tensor, keys: torch.Tensor, tau_attention: float
) -> torch.Tensor:
    """s_i = cos(r_i, e_i) for every (example, candidate): ``dots`` (B, L, C) = e_hl . e_i, ``gram`` (B, L, L)
    = e_hl . e_hm, ``keys`` (B, L) True where history slot l holds an item (every row holds one)."""
    logits = (dots / tau_attention).masked_fill(~keys[:, :, None], float("-inf"))
    attention = torch.softmax(logits, dim=1)  # over the history: (B, L, C)
    agreement = (attention * dots).sum(1)  # r_i . e_i
    norm2 = (attention * torch.bmm(gram, attention)).sum(1)  # |r_i|^2
    return agreement / norm2.clamp_min(1e-12).sqrt()


def train_courier(
    data_dir: str | Path,
    train_rows: pa.Table,
    valid_rows: pa.Table,
    cfg: CourierConfig,
    progress: ProgressHook | None = None,
    report: Callable[[str], None] | None = None,
) -> CourierSummary:
    """Train the head on ``train_rows`` (a training sample split), select its epoch by recall@k on
    ``valid_rows``, and write the table and metrics into ``data_dir`` (see the module docstring).
    ``report``: one line per epoch (loss, recall, time, steps/s). Runs on ``cfg.threads`` torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded here; the caller's random stream is left alone
            return _train_courier(Path(data_dir), train_rows, valid_rows, cfg, progress, report)
    finally:
        torch.set_num_threads(threads)


def _train_courier(
    data_dir: Path,
    train_rows: pa.Table,
    valid_rows: pa.Table,
    cfg: CourierConfig,
    progress: ProgressHook | None,
    report: Callable[[str], None] | None,
) -> CourierSummary:
    started, started_cpu = time.perf_counter(), time.process_time()
    posters = read_posters(data_dir)
    earlier = UserClicks.from_rows(train_rows, posters)  # the training split only: no later click
    train = click_examples(train_rows, posters, cfg.history, cfg.min_history, earlier)
    valid = click_examples(valid_rows, posters, cfg.history, cfg.min_history, earlier)
    if len(valid) == 0:
        log.warning("courier: no validation click qualifies; no epoch selection, the last epoch is kept")
    if len(train) == 0:
        raise ValueError(
            f"no training click has a poster vector and {cfg.min_history}+ earlier clicks with one "
            "(embed.courier.min_history): nothing to train COURIER on"
        )
    vectors = torch.from_numpy(posters.vectors)
    mean = posters.vectors.mean(0)
    scale = standardisation_scale(posters.vectors)  # the catalogue's posters only: no events involved
    say = report or (lambda line: log.info("courier: %s", line))

    torch.manual_seed(cfg.seed)
    head = CourierHead(mean, scale.astype(np.float32), cfg.hidden, cfg.dim)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    baselines = _baseline_recalls(posters, train, valid, cfg)
    say(
        f"{len(train):,} training clicks, {len(valid):,} validation clicks, "
        f"{len(posters.item_ids):,} posters; recall@{cfg.recall_k} before training: "
        + ", ".join(f"{name} {_fmt(value)}" for name, value in baselines.items())
    )

    best_recall, best_epoch, best_state, stale = -1.0, 0, None, 0
    epochs, train_seconds, steps = [], 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        tick = time.perf_counter()
        loss = _train_epoch(head, optimizer, vectors, train, cfg, rng, f"epoch {epoch}", progress)
        seconds = time.perf_counter() - tick
        train_seconds += seconds
        steps += -(-len(train) // cfg.batch_size)
        with torch.no_grad():
            recall = recall_at_k(head(vectors), valid, cfg.recall_k, cfg.tau_attention)
        epochs.append({"epoch": epoch, "loss": loss, "valid_recall": recall, "seconds": seconds})
        say(
            f"epoch {epoch}  loss {loss:.4f}  valid recall@{cfg.recall_k} {_fmt(recall)}  {seconds:.1f} s  "
            f"{-(-len(train) // cfg.batch_size) / seconds:.1f} steps/s"
        )
        # without validation clicks nothing can select an epoch: every epoch runs and the last is kept
        if best_state is None or recall is None or recall > best_recall:
            best_recall, best_epoch, stale = -1.0 if recall is None else recall, epoch, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    head.load_state_dict(best_state)
    with torch.no_grad():
        learned = head(vectors).numpy()
    if not np.isfinite(learned).all():
        raise ValueError(
            f"COURIER's head maps some posters to NaN or infinity (lr {cfg.lr}); nothing written"
        )
    recalls = {"courier": epochs[best_epoch - 1]["valid_recall"], **baselines}

    table = pa.table(
        {
            "item_id": pa.array(posters.item_ids.tolist(), pa.string()),
            "embedding": list_column(learned, cfg.dim),
            "content_hash": pa.array(posters.content_hashes, pa.string()),
            "backbone": pa.array([f"courier-{posters.backbone}"] * len(learned), pa.string()),
        }
    )
    # the head first: a table never stands without its head (a crash in between leaves the old table
    # with a new head, which read_courier_head refuses)
    write_atomic(data_dir / COURIER_HEAD, lambda tmp: torch.save(head.to_state(posters.backbone), tmp))
    table_path = write_parquet_atomic(table, data_dir / COURIER_EMBEDDINGS)
    summary = CourierSummary(
        items=len(learned),
        dim=cfg.dim,
        train_examples=len(train),
        valid_examples=len(valid),
        epochs=len(epochs),
        best_epoch=best_epoch,
        recall=recalls,
        recall_k=cfg.recall_k,
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - started_cpu,
        train_seconds=train_seconds,
        steps_per_s=steps / train_seconds if train_seconds else 0.0,
        examples_per_s=len(train) * len(epochs) / train_seconds if train_seconds else 0.0,
        table_path=table_path,
        metrics_path=data_dir / COURIER_METRICS,
    )
    metrics: dict[str, Any] = {
        "recall_at_k": recalls,
        "k": cfg.recall_k,
        "split": (
            "valid: each user's validation click, ranked among every item with a poster; the user's "
            "earlier training clicks and history are left out of the ranking (the target never); a tie "
            "with the target counts as the expected hit under random tie-breaking"
        ),
        "selection": "courier: the recall of the epoch these clicks selected; the baselines: not selected",
        "epochs": epochs,
        "best_epoch": best_epoch,
        "train_examples": len(train),
        "valid_examples": len(valid),
        "items": len(learned),
        "backbone": posters.backbone,
        "seconds": summary.seconds,
        "cpu_seconds": summary.cpu_seconds,
        "train_seconds": train_seconds,
        "steps_per_s": summary.steps_per_s,
        "examples_per_s": summary.examples_per_s,
        "torch_threads": torch.get_num_threads(),
        "settings": cfg.model_dump(),
    }
    write_text_atomic(summary.metrics_path, json.dumps(metrics, indent=2) + "\n")
    return summary


def _train_epoch(
    head: CourierHead,
    optimizer: torch.optim.Optimizer,
    vectors: torch.Tensor,
    train: Clicks,
    cfg: CourierConfig,
    rng: np.random.Generator,
    phase: str,
    progress: ProgressHook | None,
) -> float:
    """One pass over the examples in a seeded order; the mean InfoNCE loss."""
    n_items = len(vectors)
    order = rng.permutation(len(train))
    n_steps = -(-len(order) // cfg.batch_size)
    full = cfg.negatives == 0 or cfg.negatives >= n_items
    total = 0.0
    if progress is not None:
        progress(phase, 0, n_steps)
    for step in range(n_steps):
        batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        loss = _step_loss(head, vectors, train.take(batch), cfg, rng, full)
        if not torch.isfinite(loss):  # diverged: every later step and the recall would be meaningless
            raise ValueError(
                f"COURIER's loss is not finite at {phase}, step {step + 1} (embed.courier.lr {cfg.lr}); "
                "lower the learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
        if progress is not None:
            progress(phase, step + 1, n_steps)
    return total / len(order)


def _step_loss(
    head: CourierHead,
    vectors: torch.Tensor,
    batch: Clicks,
    cfg: CourierConfig,
    rng: np.random.Generator,
    full: bool,
) -> torch.Tensor:
    """InfoNCE of each example's target (column 0) against negatives shared by the batch (the whole
    catalogue when ``full``); a negative that is the target or one of the user's earlier clicks is
    masked. The cost per example grows with the negatives, not with the batch."""
    targets, history = batch.targets, batch.history
    n_items = len(vectors)
    negatives = (
        np.arange(n_items) if full else np.sort(rng.choice(n_items, size=cfg.negatives, replace=False))
    )
    # only the items this step touches go through the head: targets, negatives and history keys
    needed = np.unique(np.r_[targets, negatives, history[history >= 0]])
    embedded = head(vectors[torch.from_numpy(needed)])  # (M, d)
    keys = torch.from_numpy(history >= 0)
    keyed = embedded[torch.from_numpy(np.searchsorted(needed, np.maximum(history, 0)))] * keys[:, :, None]
    target_vectors = embedded[torch.from_numpy(np.searchsorted(needed, targets))]  # (B, d)
    negative_vectors = embedded[torch.from_numpy(np.searchsorted(needed, negatives))]  # (K, d)
    dots = torch.cat(
        [
            torch.einsum("bld,bd->bl", keyed, target_vectors)[:, :, None],
            torch.einsum("bld,kd->blk", keyed, negative_vectors),
        ],
        dim=2,
    )  # (B, L, 1 + K)
    gram = torch.bmm(keyed, keyed.transpose(1, 2))
    scores = reconstruction_scores(dots, gram, keys, cfg.tau_attention)  # (B, 1 + K)
    masked = np.c_[np.zeros(len(targets), bool), _earlier_clicks(batch, negatives)]
    masked[:, 1:] |= negatives[None, :] == targets[:, None]
    scores = scores.masked_fill(torch.from_numpy(masked), float("-inf"))
    return nn.functional.cross_entropy(scores / cfg.tau, torch.zeros(len(targets), dtype=torch.long))


def _earlier_clicks(clicks: Clicks, candidates: np.ndarray) -> np.ndarray:
    """(B, C) True where a candidate (sorted, distinct) is among the example's earlier clicks (history keys
    and the user's earlier training clicks), other than its target."""
    mask = np.zeros((len(clicks), len(candidates)), dtype=bool)
    rows, items = clicks.earlier_pairs()
    position = np.searchsorted(candidates, items)
    hit = candidates[np.minimum(position, len(candidates) - 1)] == items if len(candidates) else position < 0
    mask[rows[hit], position[hit]] = True
    mask[clicks.targets[:, None] == candidates[None, :]] = False
    return mask


def recall_at_k(item_vectors: torch.Tensor, clicks: Clicks, k: int, tau_attention: float) -> float | None:
    """Share of ``clicks`` whose target ranks in the top ``k`` of every item by the reconstruction score
    over L2-normalised ``item_vectors`` (N, d); the example's earlier clicks are left out of the ranking
    (the target never). None without examples."""
    if len(clicks) == 0:
        return None
    with torch.no_grad():
        return _hits_by_reconstruction(item_vectors, clicks, k, tau_attention) / len(clicks)


def _hits_by_reconstruction(
    item_vectors: torch.Tensor, clicks: Clicks, k: int, tau_attention: float
) -> float:
    vectors = nn.functional.normalize(item_vectors.float(), dim=-1)
    n_items, width = vectors.shape[0], clicks.history.shape[1]
    chunk = max(1, EVAL_CELLS // (n_items * width))
    hits = 0.0
    for start in range(0, len(clicks), chunk):
        part = clicks.take(slice(start, start + chunk))
        history = part.history
        keys = torch.from_numpy(history >= 0)
        seen, inverse = np.unique(np.maximum(history, 0), return_inverse=True)
        similarity = vectors @ vectors[torch.from_numpy(seen)].T  # (N, distinct history items)
        slots = torch.from_numpy(inverse.reshape(history.shape))
        dots = similarity[:, slots].permute(1, 2, 0) * keys[:, :, None]  # (B, L, N)
        keyed = vectors[torch.from_numpy(np.maximum(history, 0))] * keys[:, :, None]
        gram = torch.bmm(keyed, keyed.transpose(1, 2))
        scores = reconstruction_scores(dots, gram, keys, tau_attention)
        hits += _hits(scores, part, k)
    return hits


def popularity_recall(train: Clicks, valid: Clicks, n_items: int, k: int) -> float | None:
    """The same recall@k for a ranking by training clicks (no image at all): the floor to beat."""
    if len(valid) == 0:
        return None
    counts = torch.from_numpy(np.bincount(train.targets, minlength=n_items).astype(np.float32))
    chunk = max(1, EVAL_CELLS // n_items)
    hits = sum(
        _hits(counts.expand(len(part), -1), part, k)
        for part in (valid.take(slice(s, s + chunk)) for s in range(0, len(valid), chunk))
    )
    return hits / len(valid)


def _hits(scores: torch.Tensor, clicks: Clicks, k: int) -> float:
    """Expected top-``k`` hits of the examples' targets among the items that are not earlier clicks, ties
    broken at random: a target with g rivals above it and t tied with it is a hit with probability
    clip((k - g) / (t + 1), 0, 1). A NaN rival counts as above the target; a target scored NaN is a miss."""
    targets = torch.from_numpy(clicks.targets)
    target_scores = scores[torch.arange(len(targets)), targets]  # (B,)
    earlier = torch.from_numpy(_earlier_clicks(clicks, np.arange(scores.shape[1])))
    rivals = scores.nan_to_num(nan=float("inf")).masked_fill(earlier, float("-inf"))
    rivals[torch.arange(len(targets)), targets] = float("-inf")  # the target is no rival of its own
    above = (rivals > target_scores[:, None]).sum(1)
    tied = (rivals == target_scores[:, None]).sum(1)
    chance = ((k - above) / (tied + 1)).clamp(0.0, 1.0)
    return float(torch.where(torch.isfinite(target_scores), chance, 0.0).sum())


def standardisation_scale(vectors: np.ndarray) -> np.ndarray:
    """(N, D) poster vectors -> (D,) the spread each channel is divided by: its own, floored at
    ``STD_FLOOR`` of the median channel's (1 if no channel varies), so a channel that never varies across
    the catalogue cannot blow a new poster's small deviation up into its whole vector."""
    spread = vectors.std(0)
    varying = spread[spread > 0]
    floor = STD_FLOOR * float(np.median(varying)) if len(varying) else 1.0
    return np.maximum(spread, floor).astype(np.float32)


def _baseline_recalls(posters: Posters, train: Clicks, valid: Clicks, cfg: CourierConfig) -> dict[str, Any]:
    """recall@k of the raw backbone space, its PCA to ``cfg.dim`` (fitted on the catalogue's posters, so on
    no events) and training popularity: what the learned space must beat."""
    raw = torch.from_numpy(posters.vectors)
    centred = posters.vectors - posters.vectors.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    pca = torch.from_numpy((centred @ components[: cfg.dim].T).astype(np.float32))
    return {
        "imagenet": recall_at_k(raw, valid, cfg.recall_k, cfg.tau_attention),
        f"imagenet_pca{cfg.dim}": recall_at_k(pca, valid, cfg.recall_k, cfg.tau_attention),
        "popularity": popularity_recall(train, valid, len(posters.item_ids), cfg.recall_k),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
