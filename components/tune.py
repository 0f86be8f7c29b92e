from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(config: str, dataset: Input[Dataset], samples: Input[Dataset], trials: Output[Artifact]) -> dict:
    """Ray Tune (ASHA) over lambda0 and the learning rate on the validation split; returns the best values."""
    from marn.stages import run_tune

    result = run_tune(config, dataset.path, samples.path, trials.path)
    trials.metadata.update(result)
    return result["best"]
