"""The A/B service for real: registered MARN and DUPN on tiny data, Feast on sqlite, Ray Serve on 127.0.0.1.

The HTTP tests talk to the service only through docs/design.md's contract, as an outside client would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import requests
import torch
import yaml

from marn.config import load_config
from marn.data.samples import SAMPLE_SCHEMA, build_samples, candidate_stat_columns, history_stat_columns
from marn.data.schema import read_dataset
from marn.data.stats import earliest_time, item_stat_table, stat_names, stats_before
from marn.data.synth import synthesize
from marn.data.tensors import encode_samples
from marn.features.materialize import materialize_features
from marn.registry import GateDecision, champion, register_model
from marn.stages import publish_item_representations, registry_dir, work_path
from marn.train import load_trained, predict, train_model
from serve.control import caller_headers

pytestmark = pytest.mark.slow

MARN = Path(sys.executable).with_name("marn")
NOW_US = 1_900_000_000 * 10**6  # a fixed "now" (2030) after every synthetic event


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_settings):
    """Synthetic data, Feast materialized, MARN and DUPN trained one epoch and registered, MARN's item
    representations published: what the pipeline leaves behind, in about half a minute."""
    root = tmp_path_factory.mktemp("serving")
    settings = tiny_settings(root / "work")
    settings["serve"]["canary"] = {"min_feedback": 5}
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    cfg = load_config(config)
    data = root / "data"
    synthesize(data, cfg.synth)
    materialize_features(data, cfg)
    for name in ("marn", "dupn"):
        run = root / "runs" / name
        train_model(
            read_dataset(data), load_config(config, {"train": {"model": name}}), run, show_progress=False
        )
        registered = register_model(registry_dir(cfg), run, data, GateDecision(True, 0.5, "test world"))
        if name == "marn":
            publish_item_representations(registered.checkpoint, cfg)
    dataset = read_dataset(data)
    users = sorted(dataset.events["user_id"].astype(str).unique())
    items = sorted(dataset.items["item_id"].astype(str).unique())
    return {"cfg": cfg, "config": config, "data": data, "users": users, "items": items}


def _scorer(world, arm):
    from serve.features import FeatureFetcher
    from serve.scoring import ArmScorer

    cfg = world["cfg"]
    fetcher = FeatureFetcher(work_path(cfg, cfg.feast.repo_dir, "feast"))
    return ArmScorer(champion(registry_dir(cfg), arm).checkpoint, fetcher, cfg.samples.max_history)


def _with_statistics(table: pa.Table, dataset) -> pa.Table:
    """Sample rows plus their point-in-time statistics, computed on the local path (build_samples')."""
    stats = item_stat_table(dataset, earliest_time(dataset))
    names = stat_names(stats)
    ts = table.column("ts").to_numpy()
    history = table.column("hist_item_ids").combine_chunks()
    lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False)
    candidates = stats_before(stats, table.column("item_id").to_numpy(zero_copy_only=False), ts)
    histories = stats_before(stats, history.flatten().to_numpy(zero_copy_only=False), np.repeat(ts, lengths))
    columns = {
        **candidate_stat_columns(names, candidates),
        **history_stat_columns(names, histories, np.r_[0, np.cumsum(lengths)]),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


@pytest.mark.parametrize("arm", ["marn", "dupn"])
def test_served_scores_equal_the_offline_model_on_the_same_inputs(world, arm):
    from serve.scoring import ScoreRequest

    scorer = _scorer(world, arm)
    if arm == "marn":
        assert scorer.uses_representations  # the 4.9.2 path: reps from Feast, not from the model
    users = [*world["users"][:4], "nobody-knows-me"]
    items = list(scorer.catalog.items.values[:30])
    requests_ = [ScoreRequest(u, items) for u in users]
    served = scorer.score(requests_, NOW_US)

    # Offline: the training path (encode_samples on sample rows built from the same Feast histories,
    # then the model's own forward, which computes every item representation itself).
    histories = scorer.histories(requests_, NOW_US)
    assert sum(len(h.items) > 0 for h in histories) == 4 and histories[-1].items == []
    rows = [
        {
            "user_id": r.user_id,
            "item_id": item,
            "label": 0,
            "ts": NOW_US,
            "hist_item_ids": h.items,
            "hist_behaviors": h.behaviors,
            "hist_ts": h.ts_us,
        }
        for r, h in zip(requests_, histories, strict=True)
        for item in r.candidates
    ]
    table = _with_statistics(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), read_dataset(world["data"]))
    batch = encode_samples(table, scorer.catalog, world["cfg"].samples.max_history, scorer.statistics).tensors
    with torch.no_grad():
        offline = torch.sigmoid(scorer.model(batch).logits).numpy()
    assert np.abs(np.concatenate(served) - offline).max() < 1e-5


def test_cold_items_use_their_feast_features_and_unknown_everything_still_scores(world):
    from serve.scoring import ScoreRequest

    scorer = _scorer(world, "marn")
    assert scorer.cold_images  # Feast's image vectors are the ones the model was trained on
    known_user, known_item = world["users"][0], world["items"][1]
    [scores] = scorer.score([ScoreRequest("a-new-user", ["never-seen-item", known_item], None)], NOW_US)
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    [with_history] = scorer.score([ScoreRequest(known_user, [known_item], ["not-an-item"])], NOW_US)
    assert 0 <= with_history[0] <= 1


def test_a_stale_representation_table_is_refused(world, tmp_path):
    """Feast reps of another model version would serve wrong scores: the scorer refuses to start."""
    from marn.train import load_trained
    from serve.features import FeatureFetcher
    from serve.scoring import ArmScorer

    cfg = world["cfg"]
    saved = torch.load(champion(registry_dir(cfg), "marn").checkpoint, weights_only=True)
    saved["state_dict"] = {k: v + 0.1 if v.is_floating_point() else v for k, v in saved["state_dict"].items()}
    other = tmp_path / "other.pt"
    torch.save(saved, other)
    assert load_trained(other).name == "marn"
    version = champion(registry_dir(cfg), "marn").version  # other weights claiming the published version
    fetcher = FeatureFetcher(work_path(cfg, cfg.feast.repo_dir, "feast"))
    with pytest.raises(RuntimeError, match="another version"):
        ArmScorer(other, fetcher, cfg.samples.max_history, version=version)


@pytest.mark.parametrize("arm", ["marn", "dupn"])
def test_test_samples_replayed_through_the_served_model_get_the_offline_scores(world, arm):
    """Test samples sent as requests at their own time, the online store materialized as of the day's
    snapshot before them: histories and point-in-time statistics come from Feast online, and the served
    scores equal the offline model's on the same samples (the training path, encode_samples)."""
    from serve.scoring import ScoreRequest

    cfg, data = world["cfg"], world["data"]
    dataset = read_dataset(data)
    test = build_samples(dataset, cfg.samples).test
    rows = test.to_pandas()
    last_history = pd.to_datetime(rows["hist_ts"].map(max)).dt.tz_localize("UTC")  # naive from arrow lists
    moments = pd.to_datetime(item_stat_table(dataset, earliest_time(dataset))["ts"].unique(), utc=True)
    # the snapshot moment T with the most test samples in (T, T + 1 day] whose history ends by T
    eligible = {
        moment: (
            (rows["ts"] > moment) & (rows["ts"] <= moment + pd.Timedelta(days=1)) & (last_history <= moment)
        )
        for moment in moments
    }
    moment, chosen = max(eligible.items(), key=lambda kv: int(kv[1].sum()))
    assert chosen.sum() >= 6, "the tiny world has too few test samples on one day"
    try:
        materialize_features(data, cfg, as_of=moment.to_pydatetime())
        scorer = _scorer(world, arm)
        served = []
        for start in range(0, len(rows), 2):  # a positive and its negative: one request
            if not chosen.iloc[start]:
                continue
            pair = rows.iloc[start : start + 2]
            now_us = int(pair["ts"].iloc[0].value // 1000)
            [scores] = scorer.score([ScoreRequest(pair["user_id"].iloc[0], pair["item_id"].tolist())], now_us)
            served += scores
        trained = load_trained(champion(registry_dir(cfg), arm).checkpoint)
        replayed = trained.encode(test.filter(pa.array(chosen.to_numpy())))
        offline = predict(trained.model, replayed)
        assert len(served) == len(offline) == chosen.sum()
        assert np.abs(np.asarray(served) - offline).max() < 1e-5
    finally:
        materialize_features(data, cfg)  # the whole range again, for the tests after this one


def test_the_load_benchmarks_serving_floor_runs_on_the_registered_arms(world):
    """benchmarks/serve_load.py's in-process floor: each arm's bare forward and whole scorer path."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    bodies = [{"user_id": u, "candidates": world["items"][:20]} for u in world["users"][:3]]
    floors = module.model_floor(world["cfg"], bodies, repeats=3)
    assert set(floors) == {"marn", "dupn"}
    assert all(f["forward_ms"] > 0 and f["scorer_ms"] > 0 for f in floors.values())


# -- the running service -------------------------------------------------------------------------------


def marn(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "COLUMNS": "200"}
    return subprocess.run([str(MARN), *args], capture_output=True, text=True, env=env, timeout=timeout)


AUTH: dict[str, dict[str, str]] = {}  # role -> the Authorization header of `serve up`'s local key


def client_post(url: str, **kwargs: Any) -> requests.Response:
    """POST as the local client (/predict, /feedback)."""
    return requests.post(url, headers={**AUTH["client"], **kwargs.pop("headers", {})}, **kwargs)


def operator_get(url: str, **kwargs: Any) -> requests.Response:
    """GET as the local operator (/ab, /ab/history)."""
    return requests.get(url, headers={**AUTH["operator"], **kwargs.pop("headers", {})}, **kwargs)


@pytest.fixture(scope="module")
def service(world):
    config = str(world["config"])
    up = marn("serve", "up", "--config", config)
    assert up.returncode == 0, up.stdout + up.stderr
    for role in ("client", "operator"):
        AUTH[role] = caller_headers(world["cfg"], role)
    yield f"http://127.0.0.1:{world['cfg'].serve.port}"
    down = marn("serve", "down", "--config", config)
    assert down.returncode == 0 and "stopped" in down.stdout
    status = marn("serve", "status", "--config", config)
    assert status.returncode == 1


def test_outside_client_gets_sticky_arms_both_arms_and_probabilities(world, service):
    items = world["items"][:40]
    seen = {}
    for user in world["users"][:40]:
        for _ in range(2):
            response = client_post(
                f"{service}/predict", json={"user_id": user, "candidates": items}, timeout=30
            )
            assert response.status_code == 200
            answer = response.json()
            assert set(answer) == {"arm", "model_version", "scores", "request_id"}
            assert answer["model_version"] == "v0001"
            assert len(answer["scores"]) == len(items) and all(0 <= s <= 1 for s in answer["scores"])
            assert seen.setdefault(user, answer["arm"]) == answer["arm"], "the arm is sticky per user"
    assert set(seen.values()) == {"marn", "dupn"}


def test_cold_start_is_served_not_an_error(world, service):
    body = {
        "user_id": "brand-new-user",
        "candidates": ["brand-new-item", world["items"][0]],
        "history": ["new"],
    }
    response = client_post(f"{service}/predict", json=body, timeout=30)
    assert response.status_code == 200 and len(response.json()["scores"]) == 2


BAD_BODIES = {
    "malformed JSON": (b'{"user_id": "u1", "candidates": [', 400),
    "not an object": (b'["u1"]', 400),
    "missing field": (json.dumps({"user_id": "u1"}).encode(), 422),
    "wrong type": (json.dumps({"user_id": 17, "candidates": ["i001"]}).encode(), 422),
    "candidates not a list": (json.dumps({"user_id": "u1", "candidates": "i001"}).encode(), 422),
    "empty candidates": (json.dumps({"user_id": "u1", "candidates": []}).encode(), 422),
    "over 1000 candidates": (
        json.dumps({"user_id": "u1", "candidates": [f"i{k}" for k in range(1001)]}).encode(),
        422,
    ),
    "huge string": (json.dumps({"user_id": "u" * 100_000, "candidates": ["i001"]}).encode(), 422),
    "huge body": (b'{"user_id": "' + b"u" * (2 << 20) + b'", "candidates": ["i001"]}', 413),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_input_gets_a_4xx_json_error(service, case):
    body, status = BAD_BODIES[case]
    response = client_post(
        f"{service}/predict", data=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)


def test_feedback_is_accepted_and_counted_per_arm(world, service):
    user = world["users"][10]
    answer = client_post(
        f"{service}/predict", json={"user_id": user, "candidates": ["i001"]}, timeout=30
    ).json()
    arm = answer["arm"]
    before = operator_get(f"{service}/ab", timeout=30).json()["arms"][arm]["feedback"]
    click = {"user_id": user, "item_id": "i001", "clicked": True, "request_id": answer["request_id"]}
    response = client_post(f"{service}/feedback", json=click, timeout=30)
    assert response.status_code == 202
    assert client_post(f"{service}/feedback", json=click, timeout=30).status_code == 409  # a replay
    bad = client_post(f"{service}/feedback", json={"user_id": user, "item_id": "i001"}, timeout=30)
    assert bad.status_code == 422 and "error" in bad.json()
    ab = operator_get(f"{service}/ab", timeout=30).json()
    assert ab["arms"][arm]["feedback"] == before + 1
    assert ab["arms"][arm]["requests"] >= 1 and ab["arms"][arm]["latency_ms"]["p50"] > 0
    assert set(ab["weights"]) == {"marn", "dupn"} and "ctr_test" in ab and "canary" in ab


def test_the_serve_router_serves_openapi_docs_and_the_dashboard(service):
    """The Serve router builds the same app as the in-process tests (tests/unit/test_serve_http.py)."""
    schema = requests.get(f"{service}/openapi.json", timeout=30).json()
    assert {"/predict", "/feedback", "/ab", "/ab/history", "/healthz", "/dashboard"} <= set(schema["paths"])
    docs = requests.get(f"{service}/docs", timeout=30)
    assert docs.status_code == 200 and "SwaggerUIBundle" in docs.text
    page = requests.get(f"{service}/dashboard", timeout=30)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    history = operator_get(f"{service}/ab/history", timeout=30).json()
    assert history["arms"] == ["marn", "dupn"] and history["snapshots"]
    # Through Serve's proxy too, a caller needs its key, and the key of its own role.
    assert requests.get(f"{service}/ab", timeout=30).status_code == 401
    anonymous = requests.post(f"{service}/predict", json={"user_id": "u", "candidates": ["i001"]}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert requests.get(f"{service}/ab", headers=AUTH["client"], timeout=30).status_code == 403


def _load(url: str, users: list[str], items: list[str], clients: int, seconds: float, max_requests: int):
    """(send time, status) of every request: ``clients`` threads, bounded in time and count."""
    out, lock = [], threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        session.headers.update(AUTH["client"])
        for n in range(max_requests // clients):
            if time.monotonic() > deadline:
                return
            body = {"user_id": users[(k * 97 + n) % len(users)], "candidates": items[:20]}
            sent = time.monotonic()
            try:
                status = session.post(f"{url}/predict", json=body, timeout=30).status_code
            except requests.RequestException:
                status = 0
            with lock:
                out.append((sent, status))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return out, threads


KILL_REPLICA = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{sys.argv[2]}#" in a["name"]]
ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
"""


def kill_replica(gcs_port: int, deployment: str) -> None:
    """``ray.kill`` one replica of ``deployment`` in the service's Ray cluster (Serve starts another). In a
    fresh process: Ray reads its auth settings once, at import, and this one may have imported it already."""
    from marn.ray_runtime import local_auth_env

    env = {**os.environ, **local_auth_env()}  # the driver authenticates as `marn serve up`'s processes do
    killer = [sys.executable, "-c", KILL_REPLICA, f"127.0.0.1:{gcs_port}", deployment]
    done = subprocess.run(killer, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_weight_changes_and_a_killed_scorer_replica_lose_no_requests(world, service):

    from serve.control import read_state

    cfg = world["cfg"]
    state = read_state(cfg)
    results, threads = _load(
        service, world["users"], world["items"], clients=4, seconds=25, max_requests=4000
    )
    time.sleep(3)
    changed = marn("serve", "weights", "marn=0.25", "dupn=0.75", "--config", str(world["config"]))
    assert changed.returncode == 0, changed.stderr
    kill_replica(state.gcs_port, "marn_scorer")
    for t in threads:
        t.join(120)
    statuses = [status for _, status in results]
    assert len(statuses) > 50
    assert statuses.count(200) == len(statuses), f"failed requests: {len(statuses) - statuses.count(200)}"
    health = requests.get(f"{service}/healthz", timeout=30).json()
    assert health["weights"] == {"marn": 0.25, "dupn": 0.75}
    # The killed replica is replaced: MARN answers again.
    deadline = time.monotonic() + 90
    arms = set()
    while time.monotonic() < deadline and "marn" not in arms:
        for k in range(30):
            r = client_post(
                f"{service}/predict", json={"user_id": f"u{k:03d}", "candidates": ["i001"]}, timeout=30
            )
            arms.add(r.json()["arm"])
        time.sleep(1)
    assert "marn" in arms


def test_replay_prints_per_arm_ctr_and_promote_judges_the_canary(world, service):
    marn("serve", "weights", "marn=0.5", "dupn=0.5", "--config", str(world["config"]))
    replay = marn(
        "serve",
        "replay",
        "--data",
        str(world["data"]),
        "--users",
        "40",
        "--candidates",
        "20",
        "--config",
        str(world["config"]),
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert (
        "marn" in replay.stdout
        and "dupn" in replay.stdout
        and "CTR" in replay.stdout
        and "recall@10" in replay.stdout
    )
    promote = marn("serve", "promote", "--config", str(world["config"]))
    assert promote.returncode == 0, promote.stderr
    assert promote.stdout.split(":")[0] in {"advance", "rollback", "hold"}
    status = marn("serve", "status", "--config", str(world["config"]))
    assert status.returncode == 0 and "router: HEALTHY" in status.stdout


def test_a_pipeline_stage_next_to_the_service_starts_its_own_ray(world, service):
    """`marn serve up` leaves a `ray start` cluster on this machine; a bare ray.init() would join it and
    refuse local sizing. Stages must get their own private Ray instead."""
    import ray

    from marn.ray_runtime import ray_session
    from serve.control import read_state

    serving = f"127.0.0.1:{read_state(world['cfg']).gcs_port}"
    with ray_session(world["cfg"].ray):
        assert ray.get_runtime_context().gcs_address != serving
        assert ray.cluster_resources()["CPU"] == world["cfg"].ray.num_cpus
