"""Model names -> builders. ``marn models`` lists these; ``marn train --model NAME`` builds one."""

from __future__ import annotations

from collections.abc import Callable

from marn.data.tensors import ItemCatalog
from marn.models.base import CTRModel
from marn.models.lr import LR

MODELS: dict[str, Callable[[ItemCatalog], CTRModel]] = {
    "lr": LR,
}


def model_names() -> list[str]:
    return list(MODELS)


def build_model(name: str, catalog: ItemCatalog) -> CTRModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}")
    return MODELS[name](catalog)
