"""Load benchmark of the A/B service on 127.0.0.1: latency, throughput and errors at several concurrencies,
against the floor of the bare model forward; optionally the fault windows (a scorer replica killed, the
weights changed under load).

    make demo                                   # registers MARN and DUPN and leaves the service up
    .venv/bin/python benchmarks/serve_load.py --config configs/local.yaml --faults

Every level is bounded in requests and seconds. Requests are 100 candidates for users of ``--data``,
with their Feast histories (no ``history`` field), as a production caller would send them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from rich.console import Console
from rich.table import Table

from marn.config import load_config
from marn.data.schema import read_dataset
from marn.ray_runtime import local_auth_env

console = Console()


@dataclass
class Sample:
    sent: float  # perf_counter at send
    latency_ms: float
    status: int  # HTTP status; 0 for a connection error
    arm: str | None


@dataclass
class LoadResult:
    clients: int
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def summary(self) -> dict[str, float | int]:
        lat = np.asarray([s.latency_ms for s in self.ok()]) if self.ok() else np.asarray([np.nan])
        return {
            "clients": self.clients,
            "requests": len(self.samples),
            "errors": len(self.samples) - len(self.ok()),
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "throughput_rps": len(self.ok()) / self.seconds if self.seconds else 0.0,
        }


def run_load(
    url: str,
    key: str,
    bodies: list[dict],
    clients: int,
    max_requests: int,
    max_seconds: float,
    during: Callable[[float], None] | None = None,
) -> LoadResult:
    """``clients`` threads POST /predict (as the client ``key``) until ``max_requests`` in all or
    ``max_seconds``; ``during(t0)`` runs in the calling thread meanwhile (fault injection)."""
    result = LoadResult(clients)
    lock, counter = threading.Lock(), [0]
    start = time.perf_counter()
    deadline = start + max_seconds

    def client(index: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        while time.perf_counter() < deadline:
            with lock:
                if counter[0] >= max_requests:
                    return
                n = counter[0]
                counter[0] += 1
            body = bodies[n % len(bodies)]
            sent = time.perf_counter()
            try:
                response = session.post(f"{url}/predict", json=body, timeout=30)
                arm = response.json().get("arm") if response.status_code == 200 else None
                status = response.status_code
            except (requests.RequestException, ValueError):
                status, arm = 0, None
            sample = Sample(sent, 1000 * (time.perf_counter() - sent), status, arm)
            with lock:
                result.samples.append(sample)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    if during is not None:
        during(start)
    for t in threads:
        t.join(max_seconds + 60)
    result.seconds = time.perf_counter() - start
    return result


def request_bodies(data_dir: Path, candidates: int, n: int, seed: int) -> list[dict]:
    dataset = read_dataset(data_dir)
    rng = np.random.default_rng(seed)
    users = dataset.events["user_id"].astype(str).unique()
    items = dataset.items["item_id"].astype(str).unique()
    return [
        {
            "user_id": str(rng.choice(users)),
            "candidates": rng.choice(items, size=min(candidates, len(items)), replace=False).tolist(),
        }
        for _ in range(n)
    ]


def model_floor(cfg, bodies: list[dict], repeats: int = 30) -> dict[str, dict[str, float]]:
    """Median ms of each arm's bare forward on one request (this process, 1 thread), the serving floor."""
    import torch

    from marn.registry import champion
    from marn.stages import registry_dir, work_path
    from serve.features import FeatureFetcher
    from serve.scoring import ArmScorer, ScoreRequest

    torch.set_num_threads(1)
    fetcher = FeatureFetcher(work_path(cfg, cfg.feast.repo_dir, "feast"))
    floors = {}
    for arm in (cfg.pipeline.model, cfg.pipeline.baseline):
        scorer = ArmScorer(champion(registry_dir(cfg), arm).checkpoint, fetcher, cfg.samples.max_history)
        work = [ScoreRequest(b["user_id"], b["candidates"]) for b in bodies[:repeats]]
        now = time.time_ns() // 1000
        histories = scorer.histories(work, now)
        codes = [scorer.item_codes([*w.candidates, *h.items]) for w, h in zip(work, histories, strict=True)]
        stats = [scorer.item_stats(list(c)) for c in codes]  # each item's current statistics, from Feast
        batches = [
            scorer.expanded_batch([w], [h], c, st, now)
            for w, h, c, st in zip(work, histories, codes, stats, strict=True)
        ]
        with torch.no_grad():
            scorer.model(batches[0])  # warm-up
            forward = []
            for batch in batches:
                t = time.perf_counter()
                scorer.model(batch)
                forward.append(1000 * (time.perf_counter() - t))
        served_path = []
        for w in work:  # the arm's whole in-process path: Feast lookups (warm cache) + its scoring
            t = time.perf_counter()
            scorer.score([w], now)
            served_path.append(1000 * (time.perf_counter() - t))
        floors[arm] = {"forward_ms": statistics.median(forward), "scorer_ms": statistics.median(served_path)}
    return floors


def kill_one_scorer(gcs_address: str, arm: str) -> str:
    import ray

    ray.init(address=gcs_address, logging_level="ERROR", log_to_driver=False)
    try:
        replicas = [
            a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{arm}_scorer#" in a["name"]
        ]
        victim = replicas[0]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        return victim["name"]
    finally:
        ray.shutdown()


def fault_windows(url: str, state, cfg, bodies: list[dict], clients: int, seconds: float) -> dict:
    """Kill a MARN scorer replica at 20% of the run and change the weights at 60%; errors per window."""
    from serve.control import caller_key, set_weights

    events: dict[str, float] = {}

    def inject(start: float) -> None:
        time.sleep(0.2 * seconds)
        events["kill"] = time.perf_counter()
        events["killed"] = kill_one_scorer(f"127.0.0.1:{state.gcs_port}", cfg.pipeline.model)
        time.sleep(max(0.0, start + 0.6 * seconds - time.perf_counter()))
        events["weights"] = time.perf_counter()
        set_weights(state, {cfg.pipeline.model: 0.25, cfg.pipeline.baseline: 0.75})
        events["weights_applied"] = time.perf_counter()

    result = run_load(
        url,
        caller_key(cfg, "client"),
        bodies,
        clients,
        max_requests=100_000,
        max_seconds=seconds,
        during=inject,
    )

    def window(t0: float, length: float) -> dict:
        inside = [s for s in result.samples if t0 <= s.sent < t0 + length]
        failed = [s for s in inside if s.status != 200]
        served = [s for s in inside if s.status == 200]
        return {
            "requests": len(inside),
            "failed": len(failed),
            "answered_by": {arm: sum(s.arm == arm for s in served) for arm in {s.arm for s in served}},
        }

    return {
        "killed_replica": events.get("killed"),
        "kill_window_10s": window(events["kill"], 10.0),
        "weights_window_5s": window(events["weights"], 5.0),
        "weights_change_s": events["weights_applied"] - events["weights"],
        "whole_run": result.summary(),
    }


def main() -> None:
    # Before anything imports Ray (it reads the auth mode once, at import): kill_one_scorer joins the
    # token-authenticated `marn serve up` cluster.
    os.environ.update(local_auth_env())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None, help="dataset whose users and items are requested")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=400, help="per level, at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="per level, at most")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument(
        "--faults", action="store_true", help="also the kill-replica and weight-change windows"
    )
    parser.add_argument("--fault-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from serve.control import caller_key, read_state

    cfg = load_config(args.config)
    state = read_state(cfg)
    if state is None:
        raise SystemExit("the service is not up: `marn serve up` (or `make demo`) first")
    # Each arm's scorer is one process: the split decides how the work spreads over the 2 cores, so every
    # run starts from the configured split (an earlier --faults run leaves 25/75 behind).
    from serve.ab import starting_weights
    from serve.control import set_weights

    weights = starting_weights([cfg.pipeline.model, cfg.pipeline.baseline], cfg.serve.weights)
    set_weights(state, weights)
    console.print(f"weights {weights}")
    data = args.data or cfg.paths.work_dir / "demo" / "data"
    bodies = request_bodies(data, args.candidates, 500, seed=11)
    floors = model_floor(cfg, bodies)
    key = caller_key(cfg, "client")
    run_load(state.url, key, bodies, 2, 40, 20)  # warm-up: caches, lazy imports

    table = Table("clients", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s", "p50 / forward")
    levels = []
    mean_forward = statistics.mean(f["forward_ms"] for f in floors.values())
    for clients in args.clients:
        s = run_load(state.url, key, bodies, clients, args.requests, args.seconds).summary()
        levels.append(s)
        table.add_row(
            str(clients),
            str(s["requests"]),
            str(s["errors"]),
            f"{s['p50_ms']:.1f}",
            f"{s['p95_ms']:.1f}",
            f"{s['p99_ms']:.1f}",
            f"{s['throughput_rps']:.1f}",
            f"{s['p50_ms'] / mean_forward:.1f}x",
        )
    console.print(table)
    for arm, f in floors.items():
        console.print(
            f"floor {arm}: bare forward {f['forward_ms']:.2f} ms, in-process scorer {f['scorer_ms']:.2f} ms "
            f"({args.candidates} candidates, 1 thread)"
        )
    report = {"levels": levels, "floors": floors, "candidates": args.candidates}
    if args.faults:
        faults = fault_windows(state.url, state, cfg, bodies, 8, args.fault_seconds)
        report["faults"] = faults
        console.print_json(json.dumps(faults))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
