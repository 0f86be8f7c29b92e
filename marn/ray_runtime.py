"""One way to start or join Ray, shared by the embed, tune and distributed-training stages.

Locally Ray is sized for this machine (2 CPUs, a 512 MB object store, no dashboard), binds 127.0.0.1 and
requires Ray's token authentication with a token generated once per user (``local_auth_env``); on a cluster
``ray.address: auto`` joins the KubeRay cluster the job runs in and leaves sizing and the token (a Secret,
kustomize/base) to it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from marn.config import RayConfig

_NO_USAGE_STATS = {"RAY_USAGE_STATS_ENABLED": "0"}
TOKEN_FILE = "ray_auth_token"


def state_dir() -> Path:
    """The user's private state folder for marn ($XDG_STATE_HOME/marn, default ~/.local/state/marn)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "marn"


def local_token_path() -> Path:
    """The local Ray token file, created once (0600, 256 random bits); its content is never printed."""
    path = state_dir() / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} is readable by others: chmod 600 it (or delete it)") from None
        return path
    with os.fdopen(descriptor, "w") as out:
        out.write(secrets.token_hex(32))
    return path


def local_auth_env() -> dict[str, str]:
    """What every process of a local Ray cluster and its drivers needs: token auth, the token by path (not
    by value, so it stays out of process listings and logs)."""
    return {**_NO_USAGE_STATS, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(local_token_path())}


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Run the body with Ray initialised; shut down only a Ray this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg.address is None:
        # Before ray.init: Ray reads the token from this process's environment. The mode is left unset so
        # that ray.init itself turns token auth on for the new cluster: Ray caches its config at import, and
        # a RAY_AUTH_MODE set afterwards would reach the cluster's processes but not this driver.
        os.environ.update(local_auth_env())
        os.environ.pop("RAY_AUTH_MODE")
        ray.init(
            # "local": a new private Ray even when `marn serve up` (ray start) runs one on this machine,
            # which a bare ray.init() would join.
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",  # nothing of the private cluster listens beyond this machine
            log_to_driver=True,
            # Workers import marn from this checkout; tests and the KFP local runner share the machine.
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **_NO_USAGE_STATS}},
        )
    else:
        ray.init(address=cfg.address)
    try:
        yield
    finally:
        ray.shutdown()
