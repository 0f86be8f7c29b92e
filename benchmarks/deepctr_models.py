"""DeepCTR-Torch's DIN and DIEN as outside references, run through our own training loop.

Why: the paper benchmark puts numbers from a widely used public implementation beside ours, trained on the
same split, so our DIN / DIEN baselines are seen not to be strawmen; the speed benchmark
(``model_speed.py``) times DeepCTR's DIN against ours on the same batches. Both see only the ID modality:
candidate item, category, brand and shop, and the history of each (DeepCTR's DIN / DIEN take no images,
titles or statistics), embedded at our ID widths.

- :func:`build_deepctr` wraps a DeepCTR model in :class:`DeepCTRModel`, a :class:`CTRModel`, so
  ``marn.train.fit`` / ``predict`` / ``save_run`` and ``marn.evaluate.unseen_item_recall`` take it as they
  take ours (``marn.train.load_trained`` does not: these names are not in ``marn.models.registry``). Their
  dense layers get the registry's Glorot init: DeepCTR's own tiny init does not learn under our AdaGrad.
- :func:`din_network`, :func:`dien_network` and :func:`input_matrix` are the shared pieces: DeepCTR's
  model on our ID fields, and our batch turned into its one float input matrix.

Notation: B batch, L ``max_history`` (DeepCTR's sequence columns have a fixed width).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import PAD, ItemCatalog
from marn.models.base import CTRModel, ModelOutput
from marn.models.layers import glorot_init

REFERENCES = ("deepctr_din", "deepctr_dien")
ATTRIBUTE_FIELDS = ("category", "brand", "shop")  # the columns of ItemCatalog.attributes, in order
ID_FIELDS = ("item_id", *ATTRIBUTE_FIELDS)
SEQ_LENGTH = "seq_length"  # DeepCTR's history-length column, shared by every sequence field
HISTORY, NEGATIVE = "hist_", "neg_hist_"  # DeepCTR's name prefixes for the history and DIEN's negatives
DIEN_ALPHA = 1.0  # weight of DIEN's auxiliary loss: DeepCTR's default and the DIEN authors' code

Batch = Mapping[str, torch.Tensor]


def import_deepctr() -> None:
    """Import deepctr_torch without its import-time version check, a thread that queries PyPI and prints on
    failure: no network traffic and no stray output, and no thread left running into the timings."""
    import requests

    def offline(*args: object, **kwargs: object) -> None:
        raise requests.ConnectionError("the benchmark does not check for deepctr-torch updates")

    before = set(threading.enumerate())
    real_get, requests.get = requests.get, offline
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import deepctr_torch  # noqa: F401

            for thread in set(threading.enumerate()) - before:
                thread.join(timeout=10)
    finally:
        requests.get = real_get


def deepctr_version() -> str | None:
    try:
        return importlib.metadata.version("deepctr-torch")
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------------
# DeepCTR's models on our ID fields
# --------------------------------------------------------------------------------------------------------


def id_fields(catalog: ItemCatalog, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Field name -> (vocabulary size, embedding width): the widths of our ItemModalities IDs."""
    return {
        "item_id": (len(catalog.items), cfg.item_dim),
        "category": (len(catalog.categories), cfg.category_dim),
        "brand": (len(catalog.brands), cfg.brand_dim),
        "shop": (len(catalog.shops), cfg.shop_dim),
    }


def feature_columns(
    catalog: ItemCatalog, cfg: ModelConfig, max_history: int, negatives: bool = False
) -> list[Any]:
    """DeepCTR's columns: each candidate ID field, its history (sharing the field's embedding table) and,
    with ``negatives``, DIEN's sampled negative history."""
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    import_deepctr()
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    fields = id_fields(catalog, cfg)
    columns: list[Any] = [SparseFeat(name, size, embedding_dim=dim) for name, (size, dim) in fields.items()]
    for prefix in (HISTORY, NEGATIVE) if negatives else (HISTORY,):
        columns += [
            VarLenSparseFeat(
                SparseFeat(f"{prefix}{name}", size, embedding_dim=dim, embedding_name=name),
                maxlen=max_history,
                length_name=SEQ_LENGTH,
            )
            for name, (size, dim) in fields.items()
        ]
    return columns


def din_network(
    catalog: ItemCatalog,
    cfg: ModelConfig,
    max_history: int,
    task: str = "regression",
    seed: int | None = None,
) -> nn.Module:
    """DeepCTR-Torch's DIN on the ID fields, sized like ours (``cfg.hidden``, ``cfg.attention_hidden``).

    Its attention MLP uses Dice (its DIN default; the DIN paper's choice); its prediction MLP keeps ReLU
    because its DIN cannot pass ``dice_dim=2`` to that DNN. No batch norm, no dropout, no embedding L2
    (DeepCTR adds that in its own ``fit`` only). ``task="regression"`` outputs the click logit (its
    PredictionLayer adds a bias and applies no sigmoid), ``"binary"`` the probability.
    ``seed``: its initialisation; None draws one from torch's global generator.
    """
    columns = feature_columns(catalog, cfg, max_history)
    from deepctr_torch.models import DIN

    return _seeded(
        lambda seed: DIN(
            columns,
            list(ID_FIELDS),
            dnn_use_bn=False,
            dnn_hidden_units=tuple(cfg.hidden),
            att_hidden_size=tuple(cfg.attention_hidden),
            att_activation="Dice",
            att_weight_normalization=False,
            l2_reg_embedding=0.0,
            dnn_dropout=0.0,
            seed=seed,
            task=task,
            device="cpu",
        ),
        seed,
    )


def dien_network(
    catalog: ItemCatalog,
    cfg: ModelConfig,
    max_history: int,
    task: str = "regression",
    seed: int | None = None,
) -> nn.Module:
    """DeepCTR-Torch's DIEN on the ID fields: AUGRU interest evolution (the DIEN paper's best) and the
    auxiliary loss on sampled negative histories (``neg_hist_*`` columns, weight ``DIEN_ALPHA``).

    Sized like ours: ``cfg.hidden`` prediction MLP, ``cfg.attention_hidden`` attention MLP; the GRUs' width is
    the concatenated ID embedding (DeepCTR ties it to its input). Attention keeps DeepCTR's DIEN defaults
    (ReLU, softmax-normalised scores); no batch norm, no dropout, no embedding L2. ``task`` and ``seed`` as
    in :func:`din_network`.
    """
    columns = feature_columns(catalog, cfg, max_history, negatives=True)
    from deepctr_torch.models import DIEN

    return _seeded(
        lambda seed: DIEN(
            columns,
            list(ID_FIELDS),
            gru_type="AUGRU",
            use_negsampling=True,
            alpha=DIEN_ALPHA,
            use_bn=False,
            dnn_hidden_units=tuple(cfg.hidden),
            att_hidden_units=tuple(cfg.attention_hidden),
            l2_reg_embedding=0.0,
            dnn_dropout=0.0,
            seed=seed,
            task=task,
            device="cpu",
        ),
        seed,
    )


def _seeded(build: Callable[[int], nn.Module], seed: int | None) -> nn.Module:
    """Build with ``seed`` without the side effect of DeepCTR's constructor, which reseeds torch's global
    generator: the caller's random stream is left where it was (after drawing the seed, if it was None)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    with torch.random.fork_rng(devices=[]):
        return build(seed)


# --------------------------------------------------------------------------------------------------------
# Our batch -> DeepCTR's input matrix
# --------------------------------------------------------------------------------------------------------


def pad_history(hist: torch.Tensor, max_history: int) -> torch.Tensor:
    """(B, W) left-aligned item codes -> (B, L), PAD on the right; a wider history cannot be fitted."""
    width = hist.shape[1]
    if width > max_history:
        raise ValueError(f"history width {width} > max_history {max_history} the model was built for")
    return F.pad(hist, (0, max_history - width), value=PAD) if width < max_history else hist


def input_matrix(
    feature_index: Mapping[str, tuple[int, int]],
    attributes: torch.Tensor,
    batch: Batch,
    max_history: int,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Our batch -> DeepCTR's float matrix (B, columns), laid out by the model's ``feature_index``.

    ``attributes``: (n_items + 1, 3) category, brand, shop per item code, so a history's attributes are
    looked up per item (PAD item -> PAD attributes). ``negatives``: (B, L) sampled item codes for DIEN's
    ``neg_hist_*`` columns; left PAD when the model has them and none are given (inference). Codes travel as
    float32, exact up to 2**24.
    """
    item = batch["item"]  # (B,)
    hist = pad_history(batch["hist_items"], max_history)  # (B, L)
    histories = {HISTORY: hist}
    if f"{NEGATIVE}item_id" in feature_index:
        if negatives is not None and negatives.shape != hist.shape:
            raise ValueError(f"negatives {tuple(negatives.shape)} != history {tuple(hist.shape)}")
        histories[NEGATIVE] = torch.full_like(hist, PAD) if negatives is None else negatives
    values = {"item_id": item[:, None], SEQ_LENGTH: batch["hist_len"][:, None]}
    for prefix, codes in histories.items():
        values[f"{prefix}item_id"] = codes
    for j, name in enumerate(ATTRIBUTE_FIELDS):
        values[name] = attributes[item, j][:, None]
        for prefix, codes in histories.items():
            values[f"{prefix}{name}"] = attributes[codes, j]
    x = torch.zeros(len(item), max(end for _, end in feature_index.values()), device=item.device)
    for name, (start, end) in feature_index.items():
        x[:, start:end] = values[name]
    return x


# --------------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------------


class DeepCTRModel(CTRModel):
    """A DeepCTR-Torch model (built with ``task="regression"``: its output is the click logit) behind our
    batch-in, :class:`ModelOutput`-out interface.

    For a DIEN with negative sampling (``neg_hist_*`` columns), each training forward draws fresh negatives,
    uniform over the real item codes 1..n_items from a generator seeded with ``negative_seed`` (one may
    coincide with the clicked item), and returns DeepCTR's auxiliary loss, already weighted by its
    ``alpha``, as ``aux_loss`` (``aux["aux"]`` unweighted): the term DeepCTR's own ``fit`` adds. In eval
    mode no negatives are drawn and ``aux_loss`` is None. The generator is not part of the state dict, so a
    resumed ``fit`` draws other negatives than an uninterrupted one. ``progress`` is unused: neither model
    has a schedule. Only run on CPU here (DeepCTR's layers keep a ``device="cpu"`` string).
    """

    def __init__(
        self,
        net: nn.Module,
        catalog: ItemCatalog,
        features: ItemFeatures,
        cfg: ModelConfig,
        max_history: int,
        negative_seed: int = 0,
    ):
        super().__init__(catalog, features, cfg)
        import_deepctr()
        from deepctr_torch.models import DIEN

        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.net = net
        self.max_history = max_history
        self.n_items = len(catalog.items) - 1  # real item codes 1..n_items
        self.samples_negatives = f"{NEGATIVE}item_id" in net.feature_index
        if self.samples_negatives and self.n_items < 1:
            raise ValueError(
                "DIEN's auxiliary loss needs at least one catalogue item to sample negatives from"
            )
        self.negatives = torch.Generator().manual_seed(negative_seed)
        # DeepCTR's DIEN fails on a batch in which no row has a history; such a batch gets a dummy row
        self.is_dien = isinstance(net, DIEN)

    def sample_negatives(self, hist_len: torch.Tensor) -> torch.Tensor:
        """(B, L) uniform item codes at each row's real history positions, PAD after them."""
        codes = torch.randint(
            1, self.n_items + 1, (len(hist_len), self.max_history), generator=self.negatives
        )
        codes = codes.to(hist_len.device)
        real = torch.arange(self.max_history, device=hist_len.device) < hist_len[:, None]  # (B, L)
        return torch.where(real, codes, PAD)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0) -> ModelOutput:
        sampling = self.samples_negatives and self.training
        if self.samples_negatives:
            self.net.use_negsampling = sampling  # DeepCTR looks negatives up, and scores them, only when set
        negatives = self.sample_negatives(batch["hist_len"]) if sampling else None
        x = input_matrix(self.net.feature_index, self.item_attributes, batch, self.max_history, negatives)
        dummy = self.is_dien and not bool((batch["hist_len"] > 0).any())
        if dummy:  # all PAD, history length 1; rows are independent (no batch norm), so it changes no output
            row = x.new_zeros(1, x.shape[1])
            row[:, self.net.feature_index[SEQ_LENGTH][0]] = 1
            x = torch.cat([x, row])
        logits = self.net(x).squeeze(-1)  # (B,)
        if dummy:
            logits = logits[:-1]
        if not sampling:
            return ModelOutput(logits)
        aux_loss = self.net.aux_loss.sum()  # (1,) zeros when no row has two behaviours, else a scalar
        return ModelOutput(logits, aux_loss=aux_loss, aux={"aux": aux_loss.detach() / self.net.alpha})


def build_deepctr(
    name: str,
    catalog: ItemCatalog,
    features: ItemFeatures,
    cfg: ModelConfig,
    max_history: int,
    init: Literal["glorot", "deepctr"] = "glorot",
) -> CTRModel:
    """One of ``REFERENCES``, as a :class:`DeepCTRModel` for histories of up to ``max_history`` behaviours.

    ``init="glorot"`` (default) applies the registry's init step for our models (``glorot_init``: Glorot
    weights, zero biases for every Linear) on top of DeepCTR's own init, which stays for embeddings and
    GRUs (normal, std 1e-4). DeepCTR's own init (``"deepctr"``: std 1e-4 for its MLPs too) suits its
    scale-free optimisers (Adam; AdaGrad from a zero accumulator): under our fit's AdaGrad (lr 0.1,
    accumulator 0.1) the gradients of such small weights barely move them, and on the tiny test world both
    models stay at validation AUC 0.5 after two epochs. Everything is seeded from torch's global generator
    (DIEN's negatives too), so ``marn.train.seed_everything`` fixes it as it fixes our models.
    """
    if name not in REFERENCES:
        raise ValueError(f"unknown DeepCTR reference {name!r}; known: {', '.join(REFERENCES)}")
    if init not in ("glorot", "deepctr"):
        raise ValueError(f"init must be 'glorot' or 'deepctr', got {init!r}")
    seed = int(torch.randint(0, 2**31 - 2, ()))
    build = din_network if name == "deepctr_din" else dien_network
    net = build(catalog, cfg, max_history, seed=seed)
    if init == "glorot":
        glorot_init(net)
    return DeepCTRModel(net, catalog, features, cfg, max_history, negative_seed=seed + 1)
