"""The MARN training pipeline (KFP v2): validate -> embed -> features -> courier -> tune -> train -> evaluate
-> register -> deploy, with DUPN trained, gated and registered beside MARN as the A/B baseline. The courier
task trains COURIER's poster vectors only when the config's embed.method is courier, and passes the dataset
on otherwise (why it is not a dsl.If branch: see ``marn_pipeline``). With pipeline.flip the candidate's
train task aligns its ID tower by ALT/FLIP first (marn.stages.flip_train_stage).

The same definition runs on Kubeflow (``compile_pipeline`` writes the IR YAML, with kfp-kubernetes
settings: a GPU node for embed, resources, the Redis secret for Feast) and on this machine
(``run_local``: the KFP local runner, each task a subprocess in this environment; kfp-kubernetes
settings are ignored there).
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import courier, deploy, embed, evaluate, features, register, train, tune, validate

PIPELINE_NAME = "marn-ctr"
DATA_PVC = "marn-data"  # the cluster's shared volume for datasets, Feast tables, runs and the registry
DATA_MOUNT = "/data"
REDIS_SECRET = (
    "marn-redis"  # kustomize/base: the Redis users and passwords, read by marn.features at run time
)


def _on_cluster(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    """Resources and the shared volume every task needs on Kubernetes (ignored by the local runner)."""
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    return task


def _with_feast_secret(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Feast's Redis as the read-write ACL user marn-pipeline (kustomize/base/redis.yaml); the scorers read as
    marn-serving, which cannot write."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=REDIS_SECRET,
        secret_key_to_env={"pipeline-user": "MARN_REDIS_USER", "pipeline-password": "MARN_REDIS_PASSWORD"},
        optional=True,  # the local runner: no Secret, Feast on sqlite
    )
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="MARN multimodal CTR: data gate to A/B deployment")
def marn_pipeline(config: str, data_dir: str, model_name: str = "marn", baseline_name: str = "dupn"):
    checked = _on_cluster(validate(config=config, data_dir=data_dir), "1", "4Gi")
    checked.set_caching_options(False)  # the data directory may change under the same path

    embedded = embed(config=config, dataset=checked.outputs["dataset"])
    _on_cluster(embedded, "4", "16Gi")
    embedded.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)  # VGG16 on a GPU (paper)
    kubernetes.add_node_selector(embedded, label_key="marn.io/pool", label_value="gpu")
    kubernetes.add_toleration(embedded, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")

    feats = _with_feast_secret(
        _on_cluster(features(config=config, dataset=embedded.outputs["embedded"]), "2", "8Gi")
    )
    samples = feats.outputs["samples"]

    # Always in the DAG, training only with embed.method courier (the method sits in the config string). A
    # dsl.If on it would need a dsl.OneOf of the two branches' datasets for tune and train to wait on, and
    # kfp 2.17's local runner fails on an artifact OneOf ("Expected 1 artifact in ArtifactSelectorSpec").
    pretrained = _on_cluster(
        courier(config=config, dataset=embedded.outputs["embedded"], samples=samples), "2", "8Gi"
    )
    dataset = pretrained.outputs["pretrained"]

    tuned = _on_cluster(tune(config=config, dataset=dataset, samples=samples), "8", "16Gi")

    registered = []
    for role, name, params in (
        ("candidate", model_name, tuned.outputs["Output"]),
        ("baseline", baseline_name, {}),
    ):
        trained = train(
            config=config,
            model_name=name,
            params=params,
            dataset=dataset,
            samples=samples,
        )
        _on_cluster(trained, "8", "16Gi").set_display_name(f"train-{role}")
        scored = _on_cluster(
            evaluate(config=config, samples=samples, model=trained.outputs["model"]), "2", "8Gi"
        ).set_display_name(f"evaluate-{role}")
        kept = register(
            config=config,
            evaluation=scored.outputs["evaluation"],
            dataset=dataset,
            model=trained.outputs["model"],
        )
        registered.append(
            _with_feast_secret(_on_cluster(kept, "2", "8Gi")).set_display_name(f"register-{role}")
        )

    deployed = _on_cluster(deploy(config=config), "1", "2Gi")
    deployed.after(*registered)


def compile_pipeline(out: "str | Path", config_text: str) -> Path:
    """Write the KFP IR YAML; the given config becomes the ``config`` parameter's default."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        marn_pipeline,
        package_path=str(out),
        pipeline_parameters={"config": config_text, "data_dir": f"{DATA_MOUNT}/datasets/current"},
    )
    return out
