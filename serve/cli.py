"""``marn serve``: the Ray Serve A/B app on this machine (up, down, status, promote, weights, replay, key),
its table printers, and the demo's last step (start the service, send one request).

The group is added to ``marn`` by the top-level ``cli`` package. Ray and the service's modules are imported
inside the commands so that ``marn --help`` stays quick.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from marn.cli import ConfigOption, config_path, console, err_console, load_cli_config
from marn.config import Config
from marn.progress import progress_bar

if TYPE_CHECKING:
    from serve.control import ServeState

app = typer.Typer(help="The Ray Serve A/B app (MARN against DUPN) on this machine.", no_args_is_help=True)


def _up(cfg: Config, config: Path | None) -> ServeState:
    """Start the service on the command's config file (the packaged default without --config), so the
    app reads the same settings as this process; exits 1 when it does not come up."""
    from serve.control import ServeError, up

    try:
        return up(cfg, str(config_path(config)), say=console.print)
    except ServeError as err:
        err_console.print(f"[red]serve up failed[/red]: {err}")
        raise typer.Exit(1) from None


@app.command("up")
def serve_up(config: ConfigOption = None) -> None:
    """Start Ray and the A/B app on 127.0.0.1 with the latest registered models; returns when it answers."""
    state = _up(load_cli_config(config), config)
    console.print(
        f"serving on {state.url}: POST /predict, POST /feedback, GET /ab; A/B dashboard "
        f"{state.url}/dashboard, API docs {state.url}/docs; Ray dashboard {state.dashboard}"
    )


@app.command("down")
def serve_down(config: ConfigOption = None) -> None:
    """Stop the A/B app and its Ray."""
    from serve.control import down

    console.print("stopped" if down(load_cli_config(config)) else "nothing was running")


@app.command("status")
def serve_status(config: ConfigOption = None) -> None:
    """Deployments, weights and per-arm A/B numbers of the running app."""
    from serve.control import APP_NAME, ab_summary, read_state, serve_details

    cfg = load_cli_config(config)
    state = read_state(cfg)
    if state is None:
        err_console.print("not running (`marn serve up`)")
        raise typer.Exit(1)
    app_details = serve_details(state)["applications"].get(APP_NAME, {})
    console.print(f"{APP_NAME}: {app_details.get('status', 'absent')} at {state.url}")
    for name, deployment in app_details.get("deployments", {}).items():
        replicas = ", ".join(r["state"] for r in deployment.get("replicas", []))
        console.print(f"  {name}: {deployment['status']} ({replicas})")
    _print_ab(ab_summary(cfg, state))


@app.command("promote")
def serve_promote(
    auto: Annotated[bool, typer.Option("--auto", help="Keep judging every --interval until done")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between judgements with --auto")] = 30.0,
    max_checks: Annotated[int, typer.Option(help="Stop --auto after this many judgements")] = 1000,
    config: ConfigOption = None,
) -> None:
    """Canary ramp: advance the candidate a step while it is not worse, roll back when it is (a CTR test)."""
    from serve.control import promote, read_state

    cfg = load_cli_config(config)
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


@app.command("weights")
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

    state = read_state(load_cli_config(config))
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


@app.command("replay")
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
    from serve.control import ServeError, caller_key, read_state
    from serve.replay import replay

    cfg = load_cli_config(config)
    if url is None:
        state = read_state(cfg)
        if state is None:
            err_console.print("not running (`marn serve up`), and no --url")
            raise typer.Exit(1)
        url = state.url
    try:
        key = caller_key(cfg, "client")
    except ServeError as err:
        err_console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    with progress_bar(console) as bar:
        task = bar.add_task("replaying users", total=None)
        result = replay(
            url,
            key,
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


@app.command("key")
def serve_key(
    name: Annotated[str, typer.Option(help="The caller's name (letters, digits, _ . -)")],
    role: Annotated[str, typer.Option(help="client (/predict, /feedback) or operator (/ab)")] = "client",
) -> None:
    """A new caller key, and the entry that lets it in: add the entry to $MARN_SERVE_CALLERS (the cluster's
    Secret marn-serve, key callers) and give the key to the caller only."""
    from serve.callers import ROLES, caller_entry, new_key

    if role not in ROLES:
        err_console.print(f"[red]--role must be one of {', '.join(ROLES)}[/red]")
        raise typer.Exit(2)
    key = new_key()
    try:
        entry = caller_entry(name, role, key)  # type: ignore[arg-type]  # checked above
    except ValueError as err:
        err_console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    console.print(f"key (give to {name} only): {key}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"entry (for $MARN_SERVE_CALLERS): {entry}", markup=False, highlight=False, soft_wrap=True)


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
    if summary.get("refused_callers"):  # 401/403 before the body was read
        console.print(
            "refused callers: " + ", ".join(f"{r} {n}" for r, n in summary["refused_callers"].items())
        )
    if summary.get("events_folded"):
        console.print(f"[yellow]{summary['events_folded']} events counted without latency/log row[/yellow]")


def serve_demo(cfg: Config, config: Path | None, data: Path) -> None:
    """The demo's end: (re)start the service with the newly registered models and show one answer."""
    import pandas as pd
    import requests

    from serve.control import caller_headers, down

    console.rule("[bold]A/B service")
    if down(cfg):
        console.print("stopped the running service: restarting it with the newly registered models")
    state = _up(cfg, config)
    events = pd.read_parquet(data / "events.parquet", columns=["user_id", "item_id"])
    body = {
        "user_id": str(events["user_id"].iloc[0]),
        "candidates": events["item_id"].astype(str).unique()[:5].tolist(),
    }
    answer = requests.post(
        f"{state.url}/predict", json=body, headers=caller_headers(cfg, "client"), timeout=30
    )
    # one unwrapped line each, taken literally: the answer carries a long request_id and JSON brackets
    console.print(
        f"POST {state.url}/predict {json.dumps(body)}\n-> {answer.status_code} {answer.text}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    console.print(
        f"the A/B service answered on {state.url} (POST /predict, POST /feedback, GET /ab; A/B dashboard "
        f"{state.url}/dashboard, API docs {state.url}/docs).\n"
        f"next: marn serve replay --data {data}{_config_flag(config)}   |   marn serve status   |   "
        "marn serve down"
    )


def _config_flag(config: Path | None) -> str:
    return f" --config {config}" if config else ""
