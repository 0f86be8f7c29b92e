from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def features(config: str, dataset: Input[Dataset], samples: Output[Dataset]):
    """Feast apply + materialize; DIN samples from point-in-time historical retrieval."""
    from marn.stages import run_features

    samples.metadata.update(run_features(config, dataset.path, samples.path))
