from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(
    config: str,
    model_name: str,
    params: dict,
    dataset: Input[Dataset],
    samples: Input[Dataset],
    model: Output[Model],
):
    """Ray Train (TorchTrainer, N workers) of one registered model with the tuned values."""
    from marn.stages import run_train

    metrics = run_train(config, dataset.path, samples.path, model_name, params, model.path)
    model.metadata.update({k: metrics[k] for k in ("model", "auc", "user_auc", "logloss", "best_epoch")})
