"""One way to start or join Ray, shared by the embed, tune and distributed-training stages.

Locally Ray is sized for this machine (2 CPUs, a 512 MB object store, no dashboard); on a cluster
``ray.address: auto`` joins the KubeRay cluster the job runs in and leaves sizing to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from marn.config import RayConfig

# Ray reads these at start-up: no usage reporting, no token-auth warning on a private local cluster.
_LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Run the body with Ray initialised; shut down only a Ray this call started."""
    import ray

    if ray.is_initialized():
        yield
        return
    for key, value in _LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    if cfg.address is None:
        ray.init(
            # "local": a new private Ray even when `marn serve up` (ray start) runs one on this machine,
            # which a bare ray.init() would join.
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
            # Workers import marn from this checkout; tests and the KFP local runner share the machine.
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **_LOCAL_ENV}},
        )
    else:
        ray.init(address=cfg.address)
    try:
        yield
    finally:
        ray.shutdown()
