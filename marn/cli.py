"""The ``marn`` command line (docs/design.md, the command contract). The only place that configures logging.

Each command is a thin shell around one library call: parse options, call ``marn``, print a summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from marn.config import Config, ConfigError, dump_config, load_config

app = typer.Typer(help="MARN: multimodal adversarial CTR prediction, end to end.", no_args_is_help=True)
data_app = typer.Typer(help="Create or import canonical datasets.", no_args_is_help=True)
import_app = typer.Typer(help="Import a public dataset into canonical tables.", no_args_is_help=True)
pipeline_app = typer.Typer(
    help="The KFP pipeline: compile it for Kubeflow or run it here.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")
app.add_typer(pipeline_app, name="pipeline")
serve_app = typer.Typer(
    help="The Ray Serve A/B app (MARN against DUPN) on this machine.", no_args_is_help=True
)
app.add_typer(serve_app, name="serve")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML config (default: built-in local)")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )


def _config(path: Path | None, overrides: dict | None = None) -> Config:
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        err_console.print(f"[red]config error[/red]: {err}")
        raise typer.Exit(2) from None


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@app.command()
def models(
    names: Annotated[bool, typer.Option("--names", help="Only the names, one a line (for scripts)")] = False,
) -> None:
    """The registered models: name, paper group, item modalities and what each is."""
    from marn.models.catalog import model_rows

    if names:
        for row in model_rows():
            typer.echo(row.name)
        return
    table = Table("name", "paper group", "modalities", "what it is")
    for row in model_rows():
        table.add_row(row.name, row.group, row.modalities, row.summary)
    console.print(table)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output dataset directory")],
    users: Annotated[int | None, typer.Option(help="Number of users")] = None,
    items: Annotated[int | None, typer.Option(help="Number of items")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    config: ConfigOption = None,
) -> None:
    """Generate the synthetic multimodal dataset (images, titles, statistics, planted user tastes)."""
    cfg = _config(config, {"synth": _drop_none({"users": users, "items": items, "seed": seed})})
    started = time.perf_counter()
    summary = _synthesize(out, cfg)
    console.print(
        f"wrote {summary.events:,} events, {summary.items:,} items ({summary.images:,} images), "
        f"{summary.users:,} users to {out} in {time.perf_counter() - started:.1f} s"
    )


def _synthesize(out: Path, cfg: Config):
    from marn.data.synth import synthesize

    with _bar() as bar:
        task = bar.add_task("synthesize users", total=cfg.synth.users)
        return synthesize(out, cfg.synth, progress=lambda done, total: bar.update(task, completed=done))


@import_app.command("movielens")
def import_movielens_cmd(
    src: Annotated[Path, typer.Option(help="ml-100k directory (u.data, u.item, u.user)")],
    out: Annotated[Path, typer.Option(help="Output dataset directory")],
    media: Annotated[Path | None, typer.Option(help="Media directory (posters/, tmdb_items.csv)")] = None,
) -> None:
    """Import MovieLens-100k (optionally with posters and plot texts) into canonical tables."""
    from marn.data.movielens import import_movielens

    _print_import(lambda: import_movielens(src, out, media=media), out)


@import_app.command("amazon")
def import_amazon_cmd(
    reviews: Annotated[Path, typer.Option(help="Reviews JSON lines (.json or .json.gz)")],
    meta: Annotated[Path, typer.Option(help="Metadata JSON lines (.json or .json.gz)")],
    out: Annotated[Path, typer.Option(help="Output dataset directory")],
    images: Annotated[Path | None, typer.Option(help="Directory of downloaded <asin>.jpg images")] = None,
) -> None:
    """Import Amazon review data (McAuley et al.) into canonical tables."""
    from marn.data.amazon import import_amazon

    _print_import(lambda: import_amazon(reviews, meta, out, images=images), out)


@import_app.command("recbole")
def import_recbole_cmd(
    src: Annotated[Path, typer.Option(help="Directory of NAME.inter, NAME.item and optional NAME.user")],
    name: Annotated[str, typer.Option(help="Dataset name: the files' stem, e.g. ml-100k")],
    out: Annotated[Path, typer.Option(help="Output dataset directory")],
) -> None:
    """Import a dataset in RecBole's atomic-file format into canonical tables."""
    from marn.data.recbole import import_recbole

    _print_import(lambda: import_recbole(src, name, out), out)


def _print_import(run, out: Path) -> None:
    started = time.perf_counter()
    try:
        summary = run()
    except (FileNotFoundError, ValueError) as err:
        err_console.print(f"[red]import failed[/red]: {err}")
        raise typer.Exit(1) from None
    console.print(
        f"wrote {summary.events:,} events, {summary.users:,} users, {summary.items:,} items "
        f"({summary.items_with_image:,} with an image) to {out} in {time.perf_counter() - started:.1f} s"
    )


@app.command()
def validate(
    data: Annotated[Path, typer.Option(help="Dataset directory")],
    report: Annotated[Path | None, typer.Option(help="Also write the report as HTML here")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the Great Expectations suites; exit 0 when clean, 1 with a readable report otherwise."""
    from marn.validate import validate_dataset

    cfg = _config(config)
    result = validate_dataset(data, cfg.validation)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(result.to_html())
    if result.success:
        console.print(f"[green]valid[/green]: {data} ({result.elapsed_s:.1f} s)")
        return
    err_console.print(result.to_text())
    raise typer.Exit(1)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Registered model name (see `marn models`)")],
    data: Annotated[Path, typer.Option(help="Dataset directory")],
    out: Annotated[Path, typer.Option(help="Run directory: metrics.json and model.pt")],
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray Train workers (DDP); 1 trains in this process")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    config: ConfigOption = None,
) -> None:
    """Train one model on a canonical dataset (DIN protocol) and write its test metrics."""
    from marn.data.schema import read_dataset
    from marn.models import model_names

    if model not in model_names():
        err_console.print(f"[red]unknown model[/red] {model!r}; registered: {', '.join(model_names())}")
        raise typer.Exit(2)
    cfg = _config(
        config,
        {
            "train": _drop_none({"model": model, "epochs": epochs, "seed": seed}),
            "distributed": _drop_none({"workers": workers}),
        },
    )
    if cfg.distributed.workers > 1:
        from marn.distributed import train_distributed

        result = train_distributed(read_dataset(data), cfg, out)
    else:
        from marn.train import train_model

        result = train_model(read_dataset(data), cfg, out)
    _print_metrics(result.metrics)
    console.print(f"metrics: {result.metrics_path}\ncheckpoint: {result.checkpoint}")


@app.command()
def tune(
    data: Annotated[Path, typer.Option(help="Dataset directory")],
    out: Annotated[Path, typer.Option(help="Where tune.json and the trials go")],
    trials: Annotated[int | None, typer.Option(help="Number of trials")] = None,
    config: ConfigOption = None,
) -> None:
    """Ray Tune (ASHA) over lambda0 and the learning rate on the validation split; prints the best values."""
    from marn.data.schema import read_dataset
    from marn.tune import tune_hyperparameters

    cfg = _config(config, {"tune": _drop_none({"trials": trials})})
    result = tune_hyperparameters(read_dataset(data), cfg, out)
    best = ", ".join(f"{name} {value:.4g}" for name, value in result.best.items())
    console.print(
        f"best of {cfg.tune.trials} trials: {best} (valid AUC {result.best_valid_auc:.4f}) -> {out}"
    )


@app.command()
def embed(
    data: Annotated[Path, typer.Option(help="Dataset directory (writes image_/title_embeddings.parquet)")],
    backbone: Annotated[str | None, typer.Option(help="mobilenet_v2 or vgg16")] = None,
    weights: Annotated[Path | None, typer.Option(help="torchvision-layout .pth state dict")] = None,
    config: ConfigOption = None,
) -> None:
    """Embed every item image (Ray Data; GPU actors when Ray sees GPUs) and title; reruns reuse the cache."""
    from marn.stages import embed_stage

    cfg = _config(config, {"embed": _drop_none({"backbone": backbone, "weights": weights})})
    summary = embed_stage(data, cfg)
    console.print(
        f"{summary['items']:,} items: {summary['computed']:,} images embedded, {summary['reused']:,} reused, "
        f"{summary['missing']:,} without an image; {summary['images_per_s']:.1f} images/s on "
        f"{summary['device']} ({summary['backbone']}) -> {summary['image_path']}"
    )


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[Path, typer.Option(help="Where to write the KFP IR YAML")],
    config: ConfigOption = None,
) -> None:
    """Compile the pipeline for Kubeflow; the config becomes the run's default ``config`` parameter."""
    from pipelines.marn_pipeline import compile_pipeline

    compile_pipeline(out, dump_config(_config(config)))
    console.print(f"wrote {out}")


@pipeline_app.command("schedule")
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
        package = compile_pipeline(Path(tmp) / "marn.yaml", dump_config(_config(config)))
        run_id = schedule_recurring_run(host, package, cron, data_dir, namespace=namespace)
    console.print(f"recurring run {run_id}: {cron} on {host}")


@pipeline_app.command("run")
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
    cfg = _config(config)
    times: dict[str, float] = {}
    if data is None:
        data = cfg.paths.work_dir / "pipeline" / "data"
        with _Timer(times, "synthesize"):
            _synthesize(data, cfg)
    _run_pipeline(cfg, data, times, if_new_data)


@app.command()
def demo(
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="End with the A/B service up")] = True,
    config: ConfigOption = None,
) -> None:
    """The main job on the embedded default: synthesize, the whole pipeline with the KFP local runner, then
    the A/B service on 127.0.0.1 with the models it registered."""
    cfg = _config(config)
    data = cfg.paths.work_dir / "demo" / "data"
    times: dict[str, float] = {}
    with _Timer(times, "synthesize"):
        summary = _synthesize(data, cfg)
    console.print(f"{summary.events:,} events, {summary.items:,} items, {summary.users:,} users -> {data}")
    _run_pipeline(cfg, data, times, if_new_data=False)
    if serve:
        _serve_demo(cfg, config, data)


def _serve_demo(cfg: Config, config: Path | None, data: Path) -> None:
    import pandas as pd
    import requests

    from serve.control import ServeError, down, up

    console.rule("[bold]A/B service")
    if down(cfg):
        console.print("stopped the running service: restarting it with the newly registered models")
    try:
        state = up(cfg, str(config) if config else None, say=console.print)
    except ServeError as err:
        err_console.print(f"[red]serve up failed[/red]: {err}")
        raise typer.Exit(1) from None
    events = pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id"])
    body = {
        "user_id": str(events["user_id"].iloc[0]),
        "candidates": events["item_id"].astype(str).unique()[:5].tolist(),
    }
    answer = requests.post(f"{state.url}/predict", json=body, timeout=30)
    # one unwrapped line each, taken literally: the answer carries a long request_id and JSON brackets
    console.print(
        f"POST {state.url}/predict {json.dumps(body)}\n-> {answer.status_code} {answer.text}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    console.print(
        f"the A/B service answered on {state.url} (POST /predict, POST /feedback, GET /ab).\n"
        f"next: marn serve replay --data {data}{_config_flag(config)}   |   marn serve status   |   "
        "marn serve down"
    )


def _config_flag(config: Path | None) -> str:
    return f" --config {config}" if config else ""


def _run_pipeline(cfg: Config, data: Path, times: dict[str, float], if_new_data: bool) -> None:
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


@serve_app.command("up")
def serve_up(config: ConfigOption = None) -> None:
    """Start Ray and the A/B app on 127.0.0.1 with the latest registered models; returns when it answers."""
    from serve.control import ServeError, up

    cfg = _config(config)
    try:
        state = up(cfg, str(config) if config else None, say=console.print)
    except ServeError as err:
        err_console.print(f"[red]serve up failed[/red]: {err}")
        raise typer.Exit(1) from None
    console.print(
        f"serving on {state.url}: POST /predict, POST /feedback, GET /ab; Ray dashboard {state.dashboard}"
    )


@serve_app.command("down")
def serve_down(config: ConfigOption = None) -> None:
    """Stop the A/B app and its Ray."""
    from serve.control import down

    console.print("stopped" if down(_config(config)) else "nothing was running")


@serve_app.command("status")
def serve_status(config: ConfigOption = None) -> None:
    """Deployments, weights and per-arm A/B numbers of the running app."""
    from serve.control import APP_NAME, ab_summary, read_state, serve_details

    state = read_state(_config(config))
    if state is None:
        err_console.print("not running (`marn serve up`)")
        raise typer.Exit(1)
    app_details = serve_details(state)["applications"].get(APP_NAME, {})
    console.print(f"{APP_NAME}: {app_details.get('status', 'absent')} at {state.url}")
    for name, deployment in app_details.get("deployments", {}).items():
        replicas = ", ".join(r["state"] for r in deployment.get("replicas", []))
        console.print(f"  {name}: {deployment['status']} ({replicas})")
    _print_ab(ab_summary(state))


@serve_app.command("promote")
def serve_promote(
    auto: Annotated[bool, typer.Option("--auto", help="Keep judging every --interval until done")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between judgements with --auto")] = 30.0,
    max_checks: Annotated[int, typer.Option(help="Stop --auto after this many judgements")] = 1000,
    config: ConfigOption = None,
) -> None:
    """Canary ramp: advance the candidate a step while it is not worse, roll back when it is (a CTR test)."""
    from serve.control import promote, read_state

    cfg = _config(config)
    state = read_state(cfg)
    if state is None:
        err_console.print("not running (`marn serve up`)")
        raise typer.Exit(1)
    for check in range(max_checks if auto else 1):
        decision = promote(cfg, state)
        console.print(f"{decision.action}: {decision.reason}; weights {decision.weights}")
        if decision.action in ("done", "rollback") or not auto:
            break
        if check + 1 < max_checks:
            time.sleep(interval)


@serve_app.command("weights")
def serve_weights(
    weights: Annotated[
        list[str], typer.Argument(help="ARM=SHARE pairs summing to 1, e.g. marn=0.25 dupn=0.75")
    ],
    shadow: Annotated[
        bool | None, typer.Option("--shadow/--no-shadow", help="Also score on the other arm")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Set the router's weights (and shadow mode) live."""
    from serve.control import read_state, set_weights

    state = read_state(_config(config))
    if state is None:
        err_console.print("not running (`marn serve up`)")
        raise typer.Exit(1)
    try:
        parsed = {arm: float(share) for arm, share in (w.split("=", 1) for w in weights)}
        applied = set_weights(state, parsed, shadow)
    except ValueError as err:
        err_console.print(f"[red]bad weights[/red]: {err}")
        raise typer.Exit(2) from None
    console.print(f"router user_config now {applied}")


@serve_app.command("replay")
def serve_replay(
    data: Annotated[Path, typer.Option(help="Dataset directory: its users' last events are replayed")],
    users: Annotated[int, typer.Option(help="At most this many test users")] = 500,
    candidates: Annotated[int, typer.Option(help="Candidates a request: the real next item + sampled")] = 100,
    k: Annotated[int, typer.Option("--k", help="Items shown: the top K by score")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for users and sampled candidates")] = 7,
    url: Annotated[
        str | None, typer.Option(help="Service URL (default: the running `marn serve up`)")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Offline A/B simulation: held-out users against the service, feedback from their real next item."""
    from serve.control import read_state
    from serve.replay import replay

    cfg = _config(config)
    if url is None:
        state = read_state(cfg)
        if state is None:
            err_console.print("not running (`marn serve up`), and no --url")
            raise typer.Exit(1)
        url = state.url
    with _bar() as bar:
        task = bar.add_task("replaying users", total=None)
        result = replay(
            url,
            data,
            users,
            candidates,
            k,
            seed,
            cfg.samples.max_history,
            lambda n, total: bar.update(task, completed=n, total=total),
        )
    table = Table("arm", "users", "shown", "clicks", "CTR", f"recall@{k}", title="replay: offline A/B")
    for arm, r in sorted(result["arms"].items()):
        table.add_row(
            arm, str(r["users"]), str(r["shown"]), str(r["clicks"]), f"{r['ctr']:.4f}", f"{r['recall']:.4f}"
        )
    console.print(table)
    test = result["ctr_test"]
    if test["z"] is not None:
        console.print(f"{test['a']} vs {test['b']}: z {test['z']:.2f}, two-sided p {test['p_two_sided']:.3g}")
    if result["failed"]:
        err_console.print(f"[red]{result['failed']} requests failed[/red]")
        raise typer.Exit(1)


def _print_ab(summary: dict) -> None:
    table = Table(
        "arm", "weight", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "feedback", "CTR", title="A/B"
    )
    for arm, a in summary["arms"].items():
        lat = a["latency_ms"]
        table.add_row(
            arm,
            f"{summary['weights'].get(arm, 0):.2f}",
            str(a["requests"]),
            str(a["errors"]),
            *("-" if lat[q] is None else f"{lat[q]:.1f}" for q in ("p50", "p95", "p99")),
            str(a["feedback"]),
            "-" if a["ctr"] is None else f"{a['ctr']:.4f}",
        )
    console.print(table)
    test = summary["ctr_test"]
    if test["difference"] is not None:
        console.print(
            f"CTR {test['candidate']} - {test['baseline']}: "
            f"{test['difference']:+.4f} (user-clustered se {test['se']:.4f})"
        )
    if "canary" in summary:
        nxt = summary["canary"]["next"]
        console.print(f"canary next: {nxt['action']} ({nxt['reason']})")
    if summary.get("rejected_feedback"):  # forged, expired, replayed, mismatched: never in the CTR
        console.print(
            "rejected feedback: " + ", ".join(f"{r} {n}" for r, n in summary["rejected_feedback"].items())
        )
    if summary.get("events_folded"):
        console.print(f"[yellow]{summary['events_folded']} events counted without latency/log row[/yellow]")


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


class _Timer:
    def __init__(self, times: dict[str, float], name: str):
        self.times, self.name = times, name

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.times[self.name] = time.perf_counter() - self.started


def _print_metrics(metrics: dict) -> None:
    table = Table(
        "metric",
        "test",
        "valid (best epoch)",
        title=f"{metrics['model']} (best epoch {metrics['best_epoch']})",
    )
    for key in ("auc", "user_auc", "logloss"):
        table.add_row(key, f"{metrics[key]:.4f}", f"{metrics['valid'][key]:.4f}")
    console.print(table)
    console.print("samples: " + json.dumps(metrics["samples"]))


def _bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
