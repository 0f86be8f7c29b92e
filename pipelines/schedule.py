"""Triggering on Kubeflow: a recurring run of the compiled pipeline (``marn pipeline schedule``).

Kubeflow's scheduler takes a 6-field cron expression (seconds first): "0 0 3 * * *" is 03:00 daily.
``max_concurrency=1`` and ``no_catchup`` keep one retraining at a time and skip missed slots after downtime;
the validation gate and the champion gate decide what a run changes.
"""

from pathlib import Path


def check_cron(expression: str) -> str:
    fields = expression.split()
    if len(fields) != 6:
        raise ValueError(
            f"Kubeflow cron needs 6 fields (second minute hour day month weekday), got {len(fields)}: "
            f"{expression!r}; e.g. '0 0 3 * * *' for 03:00 daily"
        )
    return expression


def schedule_recurring_run(
    host: str,
    package: str | Path,
    cron: str,
    data_dir: str,
    experiment: str = "marn",
    job_name: str = "marn-retrain",
    namespace: str = "kubeflow",
) -> str:
    """Create (or add) the recurring run on a Kubeflow Pipelines endpoint; returns its id."""
    import kfp

    client = kfp.Client(host=host, namespace=namespace, credentials=_pod_credentials())
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    run = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=job_name,
        cron_expression=check_cron(cron),
        max_concurrency=1,
        no_catchup=True,
        pipeline_package_path=str(package),
        params={"data_dir": data_dir},
    )
    return run.recurring_run_id


KFP_TOKEN = Path("/var/run/secrets/kubeflow/pipelines/token")  # a projected token, audience the KFP API


def _pod_credentials(token: Path = KFP_TOKEN):
    """In a pod with the KFP service-account token mounted (multi-user Kubeflow), authenticate with it;
    elsewhere None (single-user KFP, or a port-forward from a laptop)."""
    if not token.exists():
        return None
    from kfp.client import ServiceAccountTokenVolumeCredentials

    return ServiceAccountTokenVolumeCredentials(path=str(token))
