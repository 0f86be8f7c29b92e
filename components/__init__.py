"""KFP v2 components, one per pipeline stage; each body is one call into ``marn.stages``.

Lightweight Python components: KFP ships each function's source to the task, so every import sits inside
the body, and the project image (``IMAGE``) already has ``marn`` installed (no pip step per task).
"""

from components.courier import courier
from components.deploy import deploy
from components.embed import embed
from components.evaluate import evaluate
from components.features import features
from components.register import register
from components.train import train
from components.tune import tune
from components.validate import validate

STAGES = ("validate", "embed", "features", "courier", "tune", "train", "evaluate", "register", "deploy")

__all__ = [
    "STAGES",
    "courier",
    "deploy",
    "embed",
    "evaluate",
    "features",
    "register",
    "train",
    "tune",
    "validate",
]
