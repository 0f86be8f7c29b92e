"""The ``marn`` command line (DESIGN.md command contract). The only place that configures logging.

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

from marn.config import Config, ConfigError, load_config

app = typer.Typer(help="MARN: multimodal adversarial CTR prediction, end to end.", no_args_is_help=True)
data_app = typer.Typer(help="Create or import canonical datasets.", no_args_is_help=True)
import_app = typer.Typer(help="Import a public dataset into canonical tables.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")

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
def models() -> None:
    """List the registered model names, one a line."""
    from marn.models import model_names

    for name in model_names():
        typer.echo(name)


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
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    config: ConfigOption = None,
) -> None:
    """Train one model on a canonical dataset (DIN protocol) and write its test metrics."""
    from marn.data.schema import read_dataset
    from marn.models import model_names
    from marn.train import train_model

    if model not in model_names():
        err_console.print(f"[red]unknown model[/red] {model!r}; registered: {', '.join(model_names())}")
        raise typer.Exit(2)
    cfg = _config(config, {"train": _drop_none({"model": model, "epochs": epochs, "seed": seed})})
    result = train_model(read_dataset(data), cfg, out)
    _print_metrics(result.metrics)
    console.print(f"metrics: {result.metrics_path}\ncheckpoint: {result.checkpoint}")


@app.command()
def demo(
    config: ConfigOption = None,
    out: Annotated[Path | None, typer.Option(help="Work directory (default: paths.work_dir)")] = None,
) -> None:
    """The main job on the embedded default: synthesize -> validate -> train and evaluate."""
    from marn.data.schema import read_dataset
    from marn.train import train_model
    from marn.validate import validate_dataset

    cfg = _config(config)
    root = out or cfg.paths.work_dir / "demo"
    data_dir, run_dir = root / "data", root / "runs" / cfg.train.model
    times: dict[str, float] = {}

    def stage(name: str):
        console.rule(f"[bold]{name}")
        return _Timer(times, name)

    with stage("synthesize"):
        summary = _synthesize(data_dir, cfg)
        console.print(
            f"{summary.events:,} events, {summary.items:,} items, {summary.users:,} users -> {data_dir}"
        )
    with stage("validate"):
        report = validate_dataset(data_dir, cfg.validation)
        (root / "validation.html").write_text(report.to_html())
        if not report.success:  # the gate: bad data stops the job here
            err_console.print(report.to_text())
            raise typer.Exit(1)
        console.print(f"[green]valid[/green]; report: {root / 'validation.html'}")
    with stage(f"train + evaluate ({cfg.train.model})"):
        result = train_model(read_dataset(data_dir), cfg, run_dir)
        _print_metrics(result.metrics)
    table = Table("stage", "seconds", title="demo stages")
    for name, seconds in times.items():
        table.add_row(name, f"{seconds:.1f}")
    table.add_row("[bold]total", f"[bold]{sum(times.values()):.1f}")
    console.print(table)
    console.print(f"metrics: {result.metrics_path}")


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
