from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def embed(config: str, dataset: Input[Dataset], embedded: Output[Dataset], metrics: Output[Metrics]):
    """Image vectors (Ray Data, GPU actors when present) and title vectors, cached by image content hash."""
    from marn.stages import run_embed

    summary = run_embed(config, dataset.path, embedded.path)
    embedded.metadata.update(summary)
    for key in ("items", "computed", "reused", "missing", "images_per_s", "seconds"):
        metrics.log_metric(key, float(summary[key]))
