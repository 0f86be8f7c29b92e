from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: str, samples: Input[Dataset], model: Input[Model], metrics: Output[Metrics]
) -> NamedTuple("Evaluation", [("passed", bool), ("evaluation", dict)]):
    """Test AUC, per-user AUC and logloss of the model artifact, and the gate against the champion."""
    from collections import namedtuple

    from marn.stages import run_evaluate

    evaluation = run_evaluate(config, samples.path, model.path)
    for key in ("auc", "user_auc", "logloss"):
        metrics.log_metric(key, evaluation["metrics"][key])
    return namedtuple("Evaluation", ["passed", "evaluation"])(evaluation["gate"]["passed"], evaluation)
