"""CTR models: MARN, its ablations and the paper's baselines, one file per family."""

from marn.models.base import CTRModel, ModelOutput
from marn.models.registry import build_model, model_names

__all__ = ["CTRModel", "ModelOutput", "build_model", "model_names"]
