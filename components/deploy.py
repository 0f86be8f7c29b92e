from kfp import dsl
from kfp.dsl import Artifact, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(config: str, deployment: Output[Artifact]) -> dict:
    """The A/B serving plan: each arm's champion version and traffic weight."""
    from marn.stages import run_deploy

    plan = run_deploy(config, deployment.path)
    deployment.metadata.update(plan)
    return plan
