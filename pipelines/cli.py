"""``marn pipeline``: compile the KFP pipeline, schedule it on Kubeflow, or run it here.

The group is added to ``marn`` by the top-level ``cli`` package. The KFP modules are imported inside the
commands so that ``marn --help`` stays quick.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from marn.cli import ConfigOption, console, err_console, load_cli_config, synthesize_with_progress
from marn.config import Config, dump_config

app = typer.Typer(help="The KFP pipeline: compile it for Kubeflow or run it here.", no_args_is_help=True)


@app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Where to write the KFP IR YAML")],
    config: ConfigOption = None,
) -> None:
    """Compile the pipeline for Kubeflow; the config becomes the run's default ``config`` parameter."""
    from pipelines.marn_pipeline import compile_pipeline

    compile_pipeline(out, dump_config(load_cli_config(config)))
    console.print(f"wrote {out}")


@app.command("schedule")
def pipeline_schedule(
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines endpoint, e.g. http://ml-pipeline-ui:80")],
    cron: Annotated[str, typer.Option(help="6-field cron, seconds first")] = "0 0 3 * * *",
    data_dir: Annotated[str, typer.Option(help="Dataset path as the cluster's tasks see it")] = (
        "/data/datasets/current"
    ),
    namespace: Annotated[
        str, typer.Option(help="Kubeflow namespace (the profile namespace on multi-user Kubeflow)")
    ] = "kubeflow",
    config: ConfigOption = None,
) -> None:
    """Compile the pipeline and create a recurring run on Kubeflow (retraining on a schedule)."""
    import tempfile

    from pipelines.marn_pipeline import compile_pipeline
    from pipelines.schedule import check_cron, schedule_recurring_run

    try:
        check_cron(cron)
    except ValueError as err:
        err_console.print(f"[red]bad --cron[/red]: {err}")
        raise typer.Exit(2) from None
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "marn.yaml", dump_config(load_cli_config(config)))
        run_id = schedule_recurring_run(host, package, cron, data_dir, namespace=namespace)
    console.print(f"recurring run {run_id}: {cron} on {host}")


@app.command("run")
def pipeline_run(
    local: Annotated[
        bool, typer.Option("--local", help="Run with the KFP local runner on this machine")
    ] = False,
    data: Annotated[Path | None, typer.Option(help="Dataset directory (default: synthesize one)")] = None,
    if_new_data: Annotated[
        bool, typer.Option("--if-new-data", help="Skip when the data has not changed since the last run")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """The whole pipeline: validate, embed, features, tune, train, evaluate, register, deploy."""
    if not local:
        err_console.print(
            "only --local runs from here; for Kubeflow, `marn pipeline compile --out FILE` and upload the "
            "file (or use the recurring run in kustomize/)"
        )
        raise typer.Exit(2)
    cfg = load_cli_config(config)
    times: dict[str, float] = {}
    if data is None:
        data = cfg.paths.work_dir / "pipeline" / "data"
        with StageTimer(times, "synthesize"):
            synthesize_with_progress(data, cfg)
    run_pipeline(cfg, data, times, if_new_data)


def run_pipeline(cfg: Config, data: Path, times: dict[str, float], if_new_data: bool) -> None:
    """Run the pipeline with the KFP local runner and print its stage times, gate table and artifacts;
    ``times`` holds stages timed before it (synthesis). Exits 1 when a stage fails."""
    from marn.stages import registry_dir, work_path
    from pipelines.local import PipelineFailed, data_is_new, remember_data, run_local

    state = cfg.paths.work_dir / "pipeline" / "last_run.json"
    new, version = data_is_new(data, state)
    if if_new_data and not new:
        console.print(f"data {data} unchanged since the last run (version {version}): nothing to do")
        return
    root = work_path(cfg, cfg.pipeline.pipeline_root, "kfp")
    console.rule(f"[bold]pipeline on {data}")
    try:
        run = run_local(dump_config(cfg), data, root, cfg.pipeline.model, cfg.pipeline.baseline)
    except PipelineFailed as err:
        _print_stage_times({**times, **err.run.stage_seconds})
        report = err.run.artifact("validate", "report")
        err_console.print(f"[red]pipeline failed[/red]: {err}")
        if report.exists():
            err_console.print(f"validation report: {report}")
        raise typer.Exit(1) from None
    remember_data(state, version, run)
    _print_stage_times({**times, **_stage_labels(run.stage_seconds, cfg)})
    table = Table("model", "test AUC", "user AUC", "logloss", "registered", title="evaluation gate")
    for task in sorted(t for t in run.outputs if t.startswith("evaluate")):
        evaluation = run.outputs[task]["evaluation"]
        registered = run.outputs.get(task.replace("evaluate", "register"), {}).get("Output", {})
        m = evaluation["metrics"]
        table.add_row(
            m["model"],
            f"{m['auc']:.4f}",
            f"{m['user_auc']:.4f}",
            f"{m['logloss']:.4f}",
            registered.get("version", "no: " + evaluation["gate"]["reason"]),
        )
    console.print(table)
    console.print(f"artifacts: {run.run_dir}")
    console.print(f"validation report: {run.artifact('validate', 'report')}")
    console.print(f"test metrics: {run.artifact('evaluate', 'metrics')} (KFP Metrics artifacts)")
    console.print(f"registry: {registry_dir(cfg).resolve()}")
    console.print(f"serving plan: {run.artifact('deploy', 'deployment')}")


def _stage_labels(seconds: dict[str, float], cfg: Config) -> dict[str, float]:
    """KFP names the second use of a component "<name>-2": here, the baseline's train/evaluate/register."""
    labelled = {}
    for task, value in seconds.items():
        if task in ("train", "evaluate", "register"):
            task = f"{task} {cfg.pipeline.model}"
        elif task.endswith("-2"):
            task = f"{task.removesuffix('-2')} {cfg.pipeline.baseline}"
        labelled[task] = value
    return labelled


def _print_stage_times(times: dict[str, float]) -> None:
    table = Table("stage", "seconds", title="pipeline stages")
    for name, seconds in times.items():
        table.add_row(name, f"{seconds:.1f}")
    table.add_row("[bold]total", f"[bold]{sum(times.values()):.1f}")
    console.print(table)


class StageTimer:
    """Adds the seconds its ``with`` block took to ``times[name]`` (stages run before the pipeline)."""

    def __init__(self, times: dict[str, float], name: str):
        self.times, self.name = times, name

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.times[self.name] = time.perf_counter() - self.started
