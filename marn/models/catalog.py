"""What each registered model is, for ``marn models``: its paper group, the item modalities it reads and
one line of description.

The rows follow the registry (:data:`marn.models.registry.MODELS`), so a newly registered model shows up
at once; until it is described here its row says so, and ``tests/unit/test_models_table.py`` fails.
MARN's variants take their modalities from :data:`marn.models.marn.VARIANTS`, the same switches that
build them.
"""

from __future__ import annotations

from dataclasses import dataclass

from marn.models.layers import MODALITIES
from marn.models.marn import VARIANTS
from marn.models.registry import model_names

BASELINE, ABLATION, REFERENCE = "Table 2 baseline", "Table 3 ablation", "reference"
UNDESCRIBED = "(not described: add it to marn/models/catalog.py)"


@dataclass(frozen=True)
class ModelInfo:
    group: str  # BASELINE, ABLATION or REFERENCE
    modalities: tuple[str, ...]  # a subset of MODALITIES, in their order
    summary: str  # one line


@dataclass(frozen=True)
class ModelRow:
    name: str
    group: str
    modalities: str
    summary: str


_IDS, _ALL = ("ids",), MODALITIES

_BASELINES = {
    "lr": (_IDS, "group 1: logistic regression over the candidate's IDs (item, category, brand, shop)"),
    "fm": (_IDS, "group 1: factorization machine (Rendle 2010) over the candidate's and history's IDs"),
    "youtubenet": (_ALL, "group 2: mean-pooled history concatenated with the candidate, then an MLP"),
    "xdeepfm": (_ALL, "group 2: linear part + compressed interaction network + DNN over field embeddings"),
    "dupn": (_ALL, "group 2: property gated LSTM and attention over behaviours; the A/B serving baseline"),
    "dien": (_ALL, "group 2: interest extractor GRU with auxiliary loss, then an attentional AUGRU"),
    "dmf": (_ALL, "group 3: dense multimodal fusion, per-modality stacks joined by shared layers"),
    "mmss": (_ALL, "group 3: modality attention with MMSS's image filter gated by the title"),
    "naml": (_ALL, "group 3: NAML's attentive multi-view item encoder and attention-pooled user"),
}
_ABLATIONS = {
    "base_ids": "IDs only, plain GRU over the history",
    "base_image": "image vector only, plain GRU",
    "base_conc": "every modality summed (CONC), plain GRU",
    "base_maf": "multimodal attention fusion (MAF), plain GRU",
    "base_maf_adv": "MAF plus one plain modality discriminator (ADV), plain GRU",
    "base_maf_ddma": "MAF plus double-discriminator adversarial learning (DDMA), plain GRU",
}
_REFERENCES = {
    "popularity": (
        ("stats",),
        "not in the paper: the candidate's point-in-time statistics alone (the floor)",
    ),
    "din": (_ALL, "not in the tables: DIN, the protocol's own model and the speed reference"),
}

MODEL_INFO: dict[str, ModelInfo] = {
    **{name: ModelInfo(BASELINE, modalities, text) for name, (modalities, text) in _BASELINES.items()},
    **{name: ModelInfo(ABLATION, VARIANTS[name].modalities, text) for name, text in _ABLATIONS.items()},
    "marn": ModelInfo(
        "the paper's model",
        VARIANTS["marn"].modalities,
        "MAF + DDMA (D0, D1 behind gradient reversal) + APGRU",
    ),
    **{name: ModelInfo(REFERENCE, modalities, text) for name, (modalities, text) in _REFERENCES.items()},
}


def model_rows() -> list[ModelRow]:
    """One row per registered model, in registry order; an undescribed one says so instead of vanishing."""
    rows = []
    for name in model_names():
        info = MODEL_INFO.get(name)
        if info is None:
            rows.append(ModelRow(name, "?", "?", UNDESCRIBED))
        else:
            rows.append(ModelRow(name, info.group, ", ".join(info.modalities), info.summary))
    return rows
