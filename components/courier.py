from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def courier(
    config: str,
    dataset: Input[Dataset],
    samples: Input[Dataset],
    pretrained: Output[Dataset],
    metrics: Output[Metrics],
):
    """COURIER poster vectors from the training split's clicks (embed.method courier); otherwise a pass."""
    from marn.stages import run_courier

    summary = run_courier(config, dataset.path, samples.path, pretrained.path)
    pretrained.metadata.update(summary)
    for name, value in summary.get("recall", {}).items():  # a recall without validation clicks is left out
        metrics.log_metric(f"valid_recall_{name}", float(value))
    for key in ("train_examples", "epochs", "best_epoch", "seconds", "steps_per_s"):
        if key in summary:
            metrics.log_metric(key, float(summary[key]))
