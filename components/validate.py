from kfp import dsl
from kfp.dsl import HTML, Dataset, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(config: str, data_dir: str, dataset: Output[Dataset], report: Output[HTML]):
    """The data gate: Great Expectations suites; bad data fails the run; the HTML report is kept."""
    from marn.stages import run_validate

    dataset.metadata.update(run_validate(config, data_dir, dataset.path, report.path))
