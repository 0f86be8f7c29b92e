"""The library's commands of ``marn`` (docs/design.md, the command contract), and the helpers every command
shares. The only place that configures logging.

Each command is a thin shell around one library call: parse options, call ``marn``, print a summary. The
adapters' groups (``marn pipeline``, ``marn serve``) and ``marn demo`` live with their adapters; the whole
``marn`` command is assembled in the top-level ``cli`` package, so this library imports no adapter.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from marn.config import Config, ConfigError, default_config_path, load_config
from marn.progress import progress_bar

HELP = "MARN: multimodal adversarial CTR prediction, end to end."

app = typer.Typer(help=HELP, no_args_is_help=True)
data_app = typer.Typer(help="Create or import canonical datasets.", no_args_is_help=True)
import_app = typer.Typer(help="Import a public dataset into canonical tables.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.add_typer(import_app, name="import")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="YAML config (default: the packaged configs/local.yaml)")
]


def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging")] = False) -> None:
    """The ``marn`` callback (attached by ``cli.main``): logging for every command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
    )


def config_path(path: Path | None) -> Path:
    """The config file a command reads: ``--config``, or the packaged ``configs/local.yaml``."""
    return default_config_path() if path is None else path


def load_cli_config(path: Path | None, overrides: dict | None = None) -> Config:
    """The command's config (see :func:`config_path`); a bad file exits 2 with the file and keys named."""
    try:
        return load_config(config_path(path), overrides)
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
    cfg = load_cli_config(config, {"synth": _drop_none({"users": users, "items": items, "seed": seed})})
    started = time.perf_counter()
    summary = synthesize_with_progress(out, cfg)
    console.print(
        f"wrote {summary.events:,} events, {summary.items:,} items ({summary.images:,} images), "
        f"{summary.users:,} users to {out} in {time.perf_counter() - started:.1f} s"
    )


def synthesize_with_progress(out: Path, cfg: Config):
    """Synthesize the dataset under a progress bar (``marn data synth``, the pipeline and the demo)."""
    from marn.data.synth import synthesize

    with progress_bar(console) as bar:
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
    from marn.validate.dataset import validate_dataset

    cfg = load_cli_config(config)
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
    params: Annotated[
        Path | None,
        typer.Option(help="A tune.json of `marn tune` for this model: its lambda0, lr and schedule horizon"),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Train one model on a canonical dataset (DIN protocol) and write its test metrics."""
    from marn.data.schema import read_dataset
    from marn.models import model_names

    if model not in model_names():
        err_console.print(f"[red]unknown model[/red] {model!r}; registered: {', '.join(model_names())}")
        raise typer.Exit(2)
    cfg = load_cli_config(
        config,
        {
            "train": _drop_none({"model": model, "epochs": epochs, "seed": seed}),
            "distributed": _drop_none({"workers": workers}),
        },
    )
    if params is not None:
        from marn.tune import read_tune_overrides

        try:
            cfg = cfg.with_overrides(read_tune_overrides(params, cfg))
        except ConfigError as err:
            err_console.print(f"[red]--params[/red]: {err}")
            raise typer.Exit(2) from None
    if cfg.distributed.workers > 1:
        from marn.distributed import train_distributed

        result = train_distributed(read_dataset(data), cfg, out, print_epoch=_print_line)
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

    cfg = load_cli_config(config, {"tune": _drop_none({"trials": trials})})
    result = tune_hyperparameters(read_dataset(data), cfg, out, console=console)
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
    from marn.progress import phase_bars
    from marn.stages import embed_stage

    cfg = load_cli_config(config, {"embed": _drop_none({"backbone": backbone, "weights": weights})})
    with phase_bars(console) as progress:
        summary = embed_stage(data, cfg, progress=progress)
    console.print(
        f"{summary['items']:,} items: {summary['computed']:,} images embedded, {summary['reused']:,} reused, "
        f"{summary['missing']:,} without an image; {summary['images_per_s']:.1f} images/s on "
        f"{summary['device']} ({summary['backbone']}) -> {summary['image_path']}"
    )


@app.command()
def courier(
    data: Annotated[
        Path, typer.Option(help="Dataset directory with image_embeddings.parquet (writes courier_embeddings)")
    ],
    samples: Annotated[
        Path | None,
        typer.Option(help="Sample splits of the features stage (train/valid.parquet); default: built here"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed")] = None,
    config: ConfigOption = None,
) -> None:
    """COURIER: train a head over the poster vectors on the training split's clicks (next click from the
    earlier ones' images, contrastive) and write courier_embeddings.parquet; models read it with
    embed.method courier."""
    from marn.progress import phase_bars
    from marn.stages import courier_stage

    cfg = load_cli_config(config, {"embed": {"courier": _drop_none({"epochs": epochs, "seed": seed})}})
    with phase_bars(console, unit="steps") as progress:
        summary = courier_stage(data, cfg, samples, progress=progress, report=_print_line)
    recall = ", ".join(f"{name} {value:.4f}" for name, value in summary["recall"].items())
    console.print(
        f"{summary['items']:,} items -> {summary['dim']}-d; best epoch {summary['best_epoch']} of "
        f"{summary['epochs']}; valid recall@{summary['recall_k']}: {recall}; {summary['seconds']:.1f} s "
        f"({summary['cpu_seconds']:.1f} s CPU; {summary['train_seconds']:.1f} s training, "
        f"{summary['examples_per_s']:,.0f} clicks/s) -> "
        f"{summary['table_path']}"
    )


def _print_line(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


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
