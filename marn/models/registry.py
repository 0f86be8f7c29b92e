"""Model names -> builders. ``marn models`` lists these; ``marn train --model NAME`` builds one.

Every builder takes the item catalogue, the item features (all modalities; LR and FM read only IDs, as in
the paper) and the ``model`` section of the config.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from marn.config import ModelConfig
from marn.data.item_features import ItemFeatures
from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel
from marn.models.dien import DIEN
from marn.models.din import DIN
from marn.models.dmf import DMF
from marn.models.dupn import DUPN
from marn.models.fm import FM
from marn.models.layers import glorot_init
from marn.models.lr import LR
from marn.models.marn import MARN, VARIANTS
from marn.models.mmss import MMSS
from marn.models.naml import NAML
from marn.models.popularity import Popularity
from marn.models.xdeepfm import XDeepFM
from marn.models.youtubenet import YoutubeNet

Builder = Callable[[ItemCatalog, ItemFeatures, ModelConfig], CTRModel]

MODELS: dict[str, Builder] = {
    # the reference: the candidate's point-in-time statistics alone (not in the paper)
    "popularity": Popularity,
    # paper Table 2, group 1: shallow models on IDs
    "lr": LR,
    "fm": FM,
    # group 2: concatenation-based models
    "youtubenet": YoutubeNet,
    "xdeepfm": XDeepFM,
    "dupn": DUPN,  # the production A/B baseline
    "din": DIN,  # not in the paper's tables; the DIN protocol's own model and the speed reference
    "dien": DIEN,
    # group 3: multimodal fusion methods
    "dmf": DMF,
    "mmss": MMSS,
    "naml": NAML,
    # MARN and its ablations (paper Table 3)
    **{name: partial(MARN, variant=variant) for name, variant in VARIANTS.items()},
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(name: str, catalog: ItemCatalog, features: ItemFeatures, cfg: ModelConfig) -> CTRModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    return glorot_init(MODELS[name](catalog, features, cfg))
