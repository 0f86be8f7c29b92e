"""Feast's Redis online store for real: a redis-server on 127.0.0.1 started by the cluster manifest's own
script (kustomize/base/redis.yaml: a read-write user for the pipeline, a read-only one for the scorers, the
default user off), materialization, online lookups, and the serving path (the scorers read Redis) against
the sqlite path.

.ci/run installs Debian's redis-server; on a machine without it these tests skip, in CI they fail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from marn.config import load_config
from marn.data.schema import read_dataset
from marn.data.synth import synthesize
from marn.features.materialize import materialize_features
from marn.features.online import online_features
from marn.features.repo import REDIS_PASSWORD_ENV, REDIS_USER_ENV
from marn.registry import GateDecision, champion, register_model
from marn.stages import publish_item_representations, registry_dir
from marn.train import train_model

pytestmark = pytest.mark.slow

REDIS_SERVER = shutil.which("redis-server")
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15
NOW_US = 1_900_000_000 * 10**6  # after every synthetic event


def manifest_script(port: int, workdir: Path) -> str:
    """kustomize/base/redis.yaml's start script, as the cluster runs it, on a free port of 127.0.0.1 and a
    scratch directory without snapshots."""
    docs = yaml.safe_load_all((REPO / "kustomize" / "base" / "redis.yaml").read_text())
    (stateful,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (container,) = stateful["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    script = container["args"][0]
    for cluster, here in (
        ("--port 6379", f"--port {port} --bind 127.0.0.1"),
        ('--save "900 1"', '--save ""'),
        ("--dir /data", f"--dir {workdir}"),
    ):
        assert script.count(cluster) == 1, cluster
        script = script.replace(cluster, here)
    return script


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> dict:
    """A private redis-server started by the cluster manifest's own script: its two ACL users (the
    pipeline's read-write one, the scorers' read-only one) with random passwords, the default user off,
    protected mode, 127.0.0.1 only, no persistence."""
    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not on PATH in CI: .ci/run installs Debian's redis-server package")
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server)")
    import redis as redis_py

    with socket.socket() as probe:  # a free port on 127.0.0.1
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    users = {
        "pipeline": {"user": "marn-pipeline", "password": secrets.token_hex(16)},
        "serving": {"user": "marn-serving", "password": secrets.token_hex(16)},
    }
    env = {
        **os.environ,
        **{f"REDIS_{role.upper()}_USER": u["user"] for role, u in users.items()},
        **{f"REDIS_{role.upper()}_PASSWORD": u["password"] for role, u in users.items()},
    }
    script = manifest_script(port, tmp_path_factory.mktemp("redis"))
    process = subprocess.Popen(
        ["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    clients = {
        role: redis_py.Redis(
            host="127.0.0.1", port=port, username=u["user"], password=u["password"], socket_timeout=2
        )
        for role, u in users.items()
    }
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            clients["serving"].ping()
            break
        except redis_py.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S} s")
            time.sleep(0.1)
    yield {"port": port, "users": users, "clients": clients}
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def as_user(monkeypatch: pytest.MonkeyPatch, redis: dict, role: str) -> None:
    """This process's Feast reaches Redis as ``role``'s ACL user (the cluster's env for that pod)."""
    monkeypatch.setenv(REDIS_USER_ENV, redis["users"][role]["user"])
    monkeypatch.setenv(REDIS_PASSWORD_ENV, redis["users"][role]["password"])


@pytest.fixture(scope="module")
def world(redis, tmp_path_factory, tiny_settings):
    """MARN and DUPN trained one epoch and registered, features materialized twice from the same data: into
    sqlite (the embedded default) and into the Redis above, MARN's item representations published to both."""
    root = tmp_path_factory.mktemp("redis_world")
    settings = tiny_settings(root / "work")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    sqlite_cfg = load_config(config)
    redis_cfg = load_config(
        config,
        {
            "feast": {
                "online_store": "redis",
                "redis_connection": f"127.0.0.1:{redis['port']}",
                "repo_dir": str(root / "feast-redis"),
            }
        },
    )
    data = root / "data"
    synthesize(data, sqlite_cfg.synth)
    with pytest.MonkeyPatch.context() as env:
        as_user(env, redis, "pipeline")  # the pipeline's tasks write as the read-write user
        redis_summary = materialize_features(data, redis_cfg)
        materialize_features(data, sqlite_cfg)
        runs = {arm: root / "runs" / arm for arm in ("marn", "dupn")}
        for arm, run in runs.items():
            arm_cfg = load_config(config, {"train": {"model": arm}})
            train_model(read_dataset(data), arm_cfg, run, show_progress=False)
        registered = {
            arm: register_model(registry_dir(sqlite_cfg), run, data, GateDecision(True, 0.5, "test"))
            for arm, run in runs.items()
        }
        for cfg in (sqlite_cfg, redis_cfg):  # the registry is shared; each online store gets MARN's reps
            publish_item_representations(registered["marn"].checkpoint, cfg)
    dataset = read_dataset(data)
    return {
        "sqlite": sqlite_cfg,
        "redis": redis_cfg,
        "redis_repo": redis_summary.repo_dir,
        "sqlite_repo": sqlite_cfg.paths.work_dir / "feast",
        "users": sorted(dataset.events["user_id"].astype(str).unique()),
        "items": sorted(dataset.items["item_id"].astype(str).unique()),
    }


def _comparable(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows as plain Python values (lists and arrays compare by content), columns in a fixed order."""
    return frame.reindex(sorted(frame.columns), axis=1).map(
        lambda v: v.tolist() if isinstance(v, np.ndarray) else v
    )


def test_materialize_writes_redis_and_online_lookups_equal_sqlite(world, redis, monkeypatch):
    assert (
        redis["clients"]["serving"].dbsize() > 0
    )  # the rows are in this Redis, not in a sqlite file beside it
    assert not list(world["redis_repo"].rglob("online_store.db"))
    users, items = [*world["users"][:8], "nobody"], [*world["items"][:20], "no-such-item"]
    as_user(monkeypatch, redis, "serving")  # serving reads as the read-only user
    from_redis = online_features(world["redis_repo"], users, items)
    monkeypatch.delenv(REDIS_PASSWORD_ENV)
    from_sqlite = online_features(world["sqlite_repo"], users, items)
    assert from_redis.users["hist_item_ids"].notna().sum() == 8  # every known user has a sequence
    pd.testing.assert_frame_equal(_comparable(from_redis.users), _comparable(from_sqlite.users))
    pd.testing.assert_frame_equal(_comparable(from_redis.items), _comparable(from_sqlite.items))


@pytest.mark.parametrize("arm", ["marn", "dupn"])
def test_scorers_reading_redis_score_as_on_sqlite(world, redis, monkeypatch, arm):
    """The serving path end to end below HTTP: the scorer's Feast reader on Redis, its scores equal."""
    from serve.features import FeatureFetcher
    from serve.scoring import ArmScorer, ScoreRequest

    checkpoint = champion(registry_dir(world["sqlite"]), arm).checkpoint
    max_history = world["sqlite"].samples.max_history
    requests_ = [ScoreRequest(u, world["items"][:25]) for u in [*world["users"][:5], "nobody"]]
    as_user(monkeypatch, redis, "serving")
    on_redis = ArmScorer(checkpoint, FeatureFetcher(world["redis_repo"]), max_history)
    if arm == "marn":
        assert on_redis.uses_representations  # item representations read from Redis too
    served_redis = on_redis.score(requests_, NOW_US)
    monkeypatch.delenv(REDIS_PASSWORD_ENV)
    served_sqlite = ArmScorer(checkpoint, FeatureFetcher(world["sqlite_repo"]), max_history).score(
        requests_, NOW_US
    )
    assert np.abs(np.array(served_redis) - np.array(served_sqlite)).max() < 1e-6


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (None, None),  # nothing: the default user is off
        ("marn-serving", "wrong-password"),
        (None, "pipeline"),  # the pipeline's password for the default user
        ("default", "pipeline"),
    ],
)
def test_a_missing_or_wrong_credential_fails_with_redis_authentication_error(
    world, redis, monkeypatch, user, password
):
    import redis as redis_py

    monkeypatch.delenv(REDIS_USER_ENV, raising=False)
    monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    if user is not None:
        monkeypatch.setenv(REDIS_USER_ENV, user)
    if password is not None:
        monkeypatch.setenv(REDIS_PASSWORD_ENV, redis["users"].get(password, {}).get("password", password))
    with pytest.raises(redis_py.AuthenticationError):
        online_features(world["redis_repo"], world["users"][:2], world["items"][:2])


def test_the_serving_user_only_reads_and_neither_user_runs_dangerous_commands(world, redis):
    """Review finding 9: a compromised scorer must not rewrite features or wipe the store."""
    import redis as redis_py

    serving, pipeline = redis["clients"]["serving"], redis["clients"]["pipeline"]
    key = next(k for k in serving.scan_iter(count=1000) if serving.type(k) == b"hash")
    assert serving.hgetall(key)  # reads what Feast wrote
    for write in (
        lambda: serving.hset(key, "forged", b"1"),
        lambda: serving.delete(key),
        lambda: serving.set("scratch", b"1"),
        lambda: serving.expire(key, 1),
    ):
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            write()
    pipeline.set("scratch", b"1")  # the pipeline writes ...
    assert pipeline.delete("scratch") == 1
    for client in (serving, pipeline):  # ... and neither wipes, reconfigures or lists the store
        for dangerous in (
            client.flushall,
            client.flushdb,
            lambda c=client: c.config_get("*"),
            lambda c=client: c.config_set("requirepass", "x"),
            lambda c=client: c.keys("*"),
            lambda c=client: c.execute_command("SHUTDOWN", "NOSAVE"),
            lambda c=client: c.acl_list(),
        ):
            with pytest.raises(redis_py.exceptions.NoPermissionError):
                dangerous()
    assert serving.dbsize() > 0


def test_the_password_is_written_nowhere(world, redis):
    """Not in feature_store.yaml, the Feast registry or anything else the runs left on disk."""
    needles = [u["password"].encode() for u in redis["users"].values()]
    work = world["sqlite"].paths.work_dir
    written = [p for root in (work, world["redis_repo"]) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "feature_store.yaml" for p in written)
    assert [p for p in written if any(n in p.read_bytes() for n in needles)] == []
