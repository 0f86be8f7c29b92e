"""Feast's Redis online store for real: a redis-server on 127.0.0.1 with a password (what the cluster runs),
materialization, online lookups, and the serving path (the scorers read Redis) against the sqlite path.

.ci/run installs Debian's redis-server; on a machine without it these tests skip, in CI they fail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from marn.config import load_config
from marn.data.schema import read_dataset
from marn.data.synth import synthesize
from marn.features.materialize import materialize_features
from marn.features.online import online_features
from marn.features.repo import REDIS_PASSWORD_ENV
from marn.registry import GateDecision, champion, register_model
from marn.stages import publish_item_representations, registry_dir
from marn.train import train_model

pytestmark = pytest.mark.slow

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 15
NOW_US = 1_900_000_000 * 10**6  # after every synthetic event


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> dict:
    """A private redis-server: 127.0.0.1 only, a random password, protected mode, no persistence."""
    if REDIS_SERVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not on PATH in CI: .ci/run installs Debian's redis-server package")
        pytest.skip("redis-server is not on PATH (Debian: apt-get install redis-server)")
    import redis as redis_py

    with socket.socket() as probe:  # a free port on 127.0.0.1
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    password = secrets.token_hex(16)
    workdir = tmp_path_factory.mktemp("redis")
    config = (
        f"port {port}\nbind 127.0.0.1\nprotected-mode yes\nrequirepass {password}\n"
        f'save ""\nappendonly no\ndir {workdir}\n'
    )
    # The config on stdin, as the cluster's StatefulSet passes it: the password is in no argument list.
    process = subprocess.Popen(
        [REDIS_SERVER, "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    process.stdin.write(config)
    process.stdin.close()
    client = redis_py.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.ping()
            break
        except redis_py.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S} s")
            time.sleep(0.1)
    yield {"port": port, "password": password, "client": client}
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


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
        env.setenv(REDIS_PASSWORD_ENV, redis["password"])
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
    assert redis["client"].dbsize() > 0  # the rows are in this Redis, not in a sqlite file beside it
    assert not list(world["redis_repo"].rglob("online_store.db"))
    users, items = [*world["users"][:8], "nobody"], [*world["items"][:20], "no-such-item"]
    monkeypatch.setenv(REDIS_PASSWORD_ENV, redis["password"])
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
    monkeypatch.setenv(REDIS_PASSWORD_ENV, redis["password"])
    on_redis = ArmScorer(checkpoint, FeatureFetcher(world["redis_repo"]), max_history)
    if arm == "marn":
        assert on_redis.uses_representations  # item representations read from Redis too
    served_redis = on_redis.score(requests_, NOW_US)
    monkeypatch.delenv(REDIS_PASSWORD_ENV)
    served_sqlite = ArmScorer(checkpoint, FeatureFetcher(world["sqlite_repo"]), max_history).score(
        requests_, NOW_US
    )
    assert np.abs(np.array(served_redis) - np.array(served_sqlite)).max() < 1e-6


@pytest.mark.parametrize("password", [None, "wrong-password"])
def test_a_missing_or_wrong_password_fails_with_redis_authentication_error(world, monkeypatch, password):
    import redis as redis_py

    if password is None:
        monkeypatch.delenv(REDIS_PASSWORD_ENV, raising=False)
    else:
        monkeypatch.setenv(REDIS_PASSWORD_ENV, password)
    with pytest.raises(redis_py.AuthenticationError):
        online_features(world["redis_repo"], world["users"][:2], world["items"][:2])


def test_the_password_is_written_nowhere(world, redis):
    """Not in feature_store.yaml, the Feast registry or anything else the runs left on disk."""
    needle = redis["password"].encode()
    work = world["sqlite"].paths.work_dir
    written = [p for root in (work, world["redis_repo"]) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "feature_store.yaml" for p in written)
    assert [p for p in written if needle in p.read_bytes()] == []
