"""The whole ``marn`` command: the library's commands (``marn.cli``), the adapters' groups
(``pipelines.cli``, ``serve.cli``) and ``marn demo``, which runs both adapters."""

from __future__ import annotations

from typing import Annotated

import typer

import marn.cli
import pipelines.cli
import serve.cli
from marn.cli import ConfigOption, console, load_cli_config, synthesize_with_progress
from pipelines.cli import StageTimer, run_pipeline
from serve.cli import serve_demo

app = typer.Typer(help=marn.cli.HELP, no_args_is_help=True, callback=marn.cli.main)
app.add_typer(marn.cli.app)  # no name: its commands and the data group join this app's top level
demo_app = typer.Typer()
app.add_typer(demo_app)
app.add_typer(pipelines.cli.app, name="pipeline")
app.add_typer(serve.cli.app, name="serve")


@demo_app.command()
def demo(
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="End with the A/B service up")] = True,
    config: ConfigOption = None,
) -> None:
    """The main job on the embedded default: synthesize, the whole pipeline with the KFP local runner, then
    the A/B service on 127.0.0.1 with the models it registered."""
    cfg = load_cli_config(config)
    data = cfg.paths.work_dir / "demo" / "data"
    times: dict[str, float] = {}
    with StageTimer(times, "synthesize"):
        summary = synthesize_with_progress(data, cfg)
    console.print(f"{summary.events:,} events, {summary.items:,} items, {summary.users:,} users -> {data}")
    run_pipeline(cfg, data, times, if_new_data=False)
    if serve:
        serve_demo(cfg, config, data)
