"""Local counterparts of the cluster lock-down: the Ray token file that `marn` and `marn serve up` use, and
the Redis password that marn.features takes from the environment at run time."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from marn.config import load_config
from marn.features.repo import (
    REDIS_PASSWORD_ENV,
    REDIS_USER_ENV,
    open_store,
    redis_connection_with_password,
    write_feature_store_yaml,
)
from marn.ray_runtime import local_auth_env, local_token_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def state_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def test_the_local_ray_token_is_made_once_private_and_passed_by_path(state_home):
    path = local_token_path()
    assert path == state_home / "marn" / "ray_auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 random bits, hex
    assert local_token_path().read_text() == token  # kept: a running cluster keeps working
    env = local_auth_env()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert token not in "".join(env.values())  # by path, so it shows in no process listing


def test_a_token_file_others_can_read_is_refused(state_home):
    path = local_token_path()
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        local_token_path()


def test_nothing_turns_local_ray_auth_off():
    for path in ("Makefile", ".ci/run", "marn/ray_runtime.py", "serve/control.py"):
        lines = [line for line in (ROOT / path).read_text().splitlines() if "RAY_AUTH_MODE" in line]
        assert not [line for line in lines if "disabled" in line], path
    assert "export RAY_AUTH_MODE := token" in (ROOT / "Makefile").read_text()


def test_the_redis_password_joins_the_connection_only_when_feast_reads_it_unchanged():
    assert redis_connection_with_password("redis:6379", "a1b2c3") == "redis:6379,password=a1b2c3"
    assert redis_connection_with_password("redis:6379,db=1", "s3cr3t") == "redis:6379,db=1,password=s3cr3t"
    for bad in ("", "with,comma", " padded", "1234", "1e10", "true", "null", '"quoted"'):
        with pytest.raises(ValueError, match=REDIS_PASSWORD_ENV):
            redis_connection_with_password("redis:6379", bad)
    with pytest.raises(ValueError, match="keep them in the environment"):
        redis_connection_with_password("redis:6379,password=old", "new-one")
    with_user = redis_connection_with_password("redis:6379", "s3cr3t", "marn-serving")
    assert with_user == "redis:6379,username=marn-serving,password=s3cr3t"  # an ACL user (redis.yaml)
    for bad in ("", "with,comma", "a b", "1234", "true", "x" * 65):
        with pytest.raises(ValueError, match=REDIS_USER_ENV):
            redis_connection_with_password("redis:6379", "s3cr3t", bad)
    with pytest.raises(ValueError, match="keep them in the environment"):
        redis_connection_with_password("redis:6379,username=old", "s3cr3t", "new")


def test_open_store_adds_the_password_at_run_time_and_writes_it_nowhere(tmp_path, monkeypatch):
    cfg = load_config(None, {"feast": {"online_store": "redis", "redis_connection": "127.0.0.1:6390"}})
    written = write_feature_store_yaml(tmp_path / "repo", cfg)
    monkeypatch.setenv(REDIS_PASSWORD_ENV, "pw-from-the-secret")
    store = open_store(tmp_path / "repo")  # no connection yet: Feast connects on first use
    assert store.config.online_store.connection_string == "127.0.0.1:6390,password=pw-from-the-secret"
    assert "pw-from-the-secret" not in written.read_text()
    monkeypatch.setenv(REDIS_USER_ENV, "marn-serving")
    with_user = open_store(tmp_path / "repo").config.online_store.connection_string
    assert with_user == "127.0.0.1:6390,username=marn-serving,password=pw-from-the-secret"
    monkeypatch.delenv(REDIS_PASSWORD_ENV)
    assert open_store(tmp_path / "repo").config.online_store.connection_string == "127.0.0.1:6390"
