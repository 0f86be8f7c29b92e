from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(config: str, evaluation: dict, dataset: Input[Dataset], model: Input[Model]) -> dict:
    """Register the model and its card when the gate passed (MARN: item representations into Feast)."""
    from marn.stages import run_register

    return run_register(config, dataset.path, model.path, evaluation)
