"""Running the A/B app on this machine: ``marn serve up | down | status | promote``.

``up`` starts a private Ray head (``ray start --head --block`` in its own process group, so ``down`` stops
exactly that cluster) and deploys a Serve config through Ray's REST API, the same document KubeRay's
RayService carries as serveConfigV2. Weight changes redeploy that document with a new router
``user_config``: a lightweight update, so no replica restarts and no request is dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

from marn.config import Config
from marn.ray_runtime import local_auth_env, local_token_path
from marn.registry import champion
from marn.stages import registry_dir
from serve.ab import CanaryDecision, RouterSettings, canary_decision, starting_weights
from serve.callers import ROLES, Role, callers_entries, new_caller_keys
from serve.tokens import new_secret

APP_NAME = "marn-ab"
IMPORT_PATH = "serve.app:build_app"
ROUTER = "router"
STATE_FILE = "serve.json"
KEYS_FILE = "keys.json"  # the local caller keys, by role (0600)
KEY_ENV = {"client": "MARN_SERVE_CLIENT_KEY", "operator": "MARN_SERVE_OPERATOR_KEY"}  # a client's own key
DEPLOY_TIMEOUT_S = 240


class ServeError(RuntimeError):
    pass


@dataclass(frozen=True)
class ServeState:
    pid: int  # the `ray start --block` process; its process group is the whole private cluster
    gcs_port: int
    dashboard: str  # http://127.0.0.1:PORT, Serve's REST API
    url: str  # http://127.0.0.1:8000
    config_path: str | None
    # the process's start time (psutil, unix s): a pid reused by another process after a reboot or crash
    # has another, so `down` never signals a stranger's process group (None: a state from before this)
    started_at: float | None = None


def arms(cfg: Config) -> list[str]:
    return [cfg.pipeline.model, cfg.pipeline.baseline]


def serve_config(
    cfg: Config, config_path: str | None, weights: dict[str, float] | None = None
) -> dict[str, Any]:
    """The Serve config document (``serve deploy`` format; RayService's serveConfigV2)."""
    weights = starting_weights(arms(cfg), weights if weights is not None else cfg.serve.weights)
    scorer = {
        "num_replicas": cfg.serve.scorer_replicas,
        "ray_actor_options": {"num_cpus": cfg.serve.scorer_cpus},
    }
    return {
        "http_options": {"host": cfg.serve.host, "port": cfg.serve.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                # No access log line per request: on 2 cores the log writes cost measurable latency.
                "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
                "args": {"config": str(Path(config_path).resolve())} if config_path else {},
                "deployments": [
                    {
                        "name": ROUTER,
                        "num_replicas": cfg.serve.router_replicas,
                        "ray_actor_options": {"num_cpus": cfg.serve.router_cpus},
                        "user_config": {"weights": weights, "shadow": cfg.serve.shadow},
                    },
                    *({"name": f"{arm}_scorer", **scorer} for arm in arms(cfg)),
                ],
            }
        ],
    }


def state_path(cfg: Config) -> Path:
    return cfg.paths.work_dir / "serve" / STATE_FILE


def keys_path(cfg: Config) -> Path:
    return cfg.paths.work_dir / "serve" / KEYS_FILE


def local_caller_keys(cfg: Config) -> dict[str, str]:
    """The client and operator keys a local ``up`` lets in: made once (readable by this user only) and
    kept, so clients go on working across restarts. Delete the file to revoke them."""
    path = keys_path(cfg)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            json.dump(new_caller_keys(), out)
    keys = json.loads(path.read_text())
    if (
        not isinstance(keys, dict)
        or set(keys) != set(ROLES)
        or not all(isinstance(k, str) for k in keys.values())
    ):
        raise ServeError(f"{path}: expected {{'client': KEY, 'operator': KEY}}; delete it to make new keys")
    return keys


def caller_key(cfg: Config, role: Role) -> str:
    """This process's key for ``role``: ``$MARN_SERVE_CLIENT_KEY`` / ``$MARN_SERVE_OPERATOR_KEY`` (a remote
    service), else the local ``up``'s keys file."""
    if os.environ.get(KEY_ENV[role]):
        return os.environ[KEY_ENV[role]]
    if keys_path(cfg).exists():
        return local_caller_keys(cfg)[role]
    raise ServeError(f"no {role} key: set ${KEY_ENV[role]} or start the service here (`marn serve up`)")


def caller_headers(cfg: Config, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {caller_key(cfg, role)}"}


def read_state(cfg: Config) -> ServeState | None:
    path = state_path(cfg)
    if not path.exists():
        return None
    state = ServeState(**json.loads(path.read_text()))
    if not _same_process(state):
        path.unlink()  # the cluster died (reboot, kill), its pid maybe reused since: forget it
        return None
    return state


def _same_process(state: ServeState) -> bool:
    """Whether ``state.pid`` is still the process `up` started (same start time), not a reused pid."""
    try:
        started = psutil.Process(state.pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # another user's process: not ours
        return False
    return state.started_at is None or abs(started - state.started_at) < 1.0


def up(cfg: Config, config_path: str | None, say: Callable[[str], None] = print) -> ServeState:
    """Start a private Ray head, deploy the app with the latest registered models, wait until it answers."""
    if read_state(cfg) is not None:
        raise ServeError(f"already up (state in {state_path(cfg)}); `marn serve down` first")
    for arm in arms(cfg):
        current = champion(registry_dir(cfg), arm)
        if current is None:
            raise ServeError(
                f"no registered {arm!r} model in {registry_dir(cfg)}: run `marn demo` (or the pipeline) first"
            )
        say(f"{arm}: {current.version} ({current.path})")
    for port, what in ((cfg.serve.port, "serve.port"), (cfg.serve.dashboard_port, "serve.dashboard_port")):
        if _port_taken(cfg.serve.host, port):
            raise ServeError(f"{cfg.serve.host}:{port} ({what}) is taken; free it or change {what}")
    gcs_port = _free_port()
    log_path = state_path(cfg).with_name("ray-start.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Token auth on the GCS, the dashboard and Serve's REST API; every Ray port binds 127.0.0.1.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **local_auth_env()}
    # The request-id signing secret reaches the routers only through the Ray processes' environment
    # (never a file or the Serve config); generated per `up` unless the caller exported one.
    env.setdefault(cfg.serve.secret_env, new_secret())
    # The callers: the operator's own list when exported, else this machine's client and operator keys.
    if not env.get(cfg.serve.callers_env):
        env[cfg.serve.callers_env] = callers_entries(local_caller_keys(cfg))  # type: ignore[arg-type]
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        f"--num-cpus={cfg.ray.num_cpus or os.cpu_count()}",
        f"--object-store-memory={cfg.ray.object_store_mb << 20}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={cfg.serve.dashboard_port}", "--disable-usage-stats",
    ]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    dashboard = f"http://127.0.0.1:{cfg.serve.dashboard_port}"
    applications = f"{dashboard}/api/serve/applications/"
    state = ServeState(
        process.pid,
        gcs_port,
        dashboard,
        f"http://{cfg.serve.host}:{cfg.serve.port}",
        config_path,
        psutil.Process(process.pid).create_time(),
    )
    state_path(cfg).write_text(json.dumps(state.__dict__))
    try:
        say(f"starting Ray (log {log_path})")
        _wait(
            lambda: requests.get(applications, headers=dashboard_headers(), timeout=2).ok,
            90,
            "Ray's dashboard",
            process,
            log_path,
        )
        say(f"deploying {APP_NAME} ({IMPORT_PATH})")
        deploy(state, serve_config(cfg, config_path))
        _wait(
            lambda: app_status(state) == "RUNNING",
            DEPLOY_TIMEOUT_S,
            "the serve app",
            process,
            log_path,
            lambda: _deploy_problem(state),
        )
        _wait(lambda: requests.get(f"{state.url}/healthz", timeout=2).ok, 30, "HTTP", process, log_path)
    except BaseException:
        down(cfg)
        raise
    return state


def down(cfg: Config) -> bool:
    """Stop the app and the private Ray cluster; False when nothing was up."""
    state = read_state(cfg)
    if state is None:
        return False
    with contextlib.suppress(requests.RequestException):  # the cluster is going anyway
        requests.delete(f"{state.dashboard}/api/serve/applications/", headers=dashboard_headers(), timeout=30)
    try:
        os.killpg(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.kill(state.pid, 0)
            time.sleep(0.3)
        os.killpg(state.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    state_path(cfg).unlink(missing_ok=True)
    return True


def dashboard_headers() -> dict[str, str]:
    """Ray's token for the local dashboard (read per call, never logged)."""
    return {"Authorization": f"Bearer {local_token_path().read_text().strip()}"}


def deploy(state: ServeState, document: dict[str, Any]) -> None:
    url = f"{state.dashboard}/api/serve/applications/"
    response = requests.put(url, json=document, headers=dashboard_headers(), timeout=60)
    if not response.ok:
        raise ServeError(f"Serve refused the config ({response.status_code}): {response.text[:2000]}")


def serve_details(state: ServeState) -> dict[str, Any]:
    url = f"{state.dashboard}/api/serve/applications/"
    response = requests.get(url, headers=dashboard_headers(), timeout=10)
    response.raise_for_status()
    return response.json()


def app_status(state: ServeState) -> str | None:
    app = serve_details(state).get("applications", {}).get(APP_NAME)
    return None if app is None else app["status"]


def ab_summary(cfg: Config, state: ServeState) -> dict[str, Any]:
    response = requests.get(f"{state.url}/ab", headers=caller_headers(cfg, "operator"), timeout=10)
    response.raise_for_status()
    return response.json()


def set_weights(state: ServeState, weights: dict[str, float], shadow: bool | None = None) -> dict[str, Any]:
    """Redeploy the running document with new router weights (a lightweight update: no restarts)."""
    details = serve_details(state)
    document = {
        "http_options": {k: details["http_options"][k] for k in ("host", "port")},
        "applications": [details["applications"][APP_NAME]["deployed_app_config"]],
    }
    router = next(d for d in document["applications"][0]["deployments"] if d["name"] == ROUTER)
    current = RouterSettings.model_validate(router["user_config"])
    settings = RouterSettings(weights=weights, shadow=current.shadow if shadow is None else shadow)
    router["user_config"] = settings.model_dump()
    deploy(state, document)
    _wait_for_weights(state, settings.weights)
    return router["user_config"]


def _wait_for_weights(state: ServeState, weights: dict[str, float], timeout_s: float = 60) -> None:
    """Return once the routers answer with the new weights (Serve applies user_config asynchronously)."""
    deadline, agreeing = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, ValueError):
            seen = requests.get(f"{state.url}/healthz", timeout=5).json()["weights"]
            agreeing = agreeing + 1 if all(abs(seen.get(a, 0) - w) < 1e-9 for a, w in weights.items()) else 0
            if agreeing >= 5:  # several answers in a row: every router replica has it
                return
        time.sleep(0.1)
    raise ServeError(f"the router did not take weights {weights} within {timeout_s:.0f} s")


def promote(cfg: Config, state: ServeState) -> CanaryDecision:
    """One canary step from the live numbers: advance, hold, roll back or done; applies the new weights.

    Safe to call at any interval (``--auto``): the decision's test is always valid under repeated looks
    (serve/sequential.py), and each weight change restarts the counts it judges."""
    candidate, baseline = arms(cfg)
    decision = canary_decision(ab_summary(cfg, state), candidate, baseline, cfg.serve.canary)
    if decision.action in ("advance", "rollback"):
        set_weights(state, decision.weights)
    return decision


def _deploy_problem(state: ServeState) -> str | None:
    """The first deployment's failure message, so a broken scorer is reported rather than waited on."""
    app = serve_details(state).get("applications", {}).get(APP_NAME)
    if app and app["status"] == "DEPLOY_FAILED":
        return app.get("message") or "DEPLOY_FAILED"
    for name, deployment in (app or {}).get("deployments", {}).items():
        if deployment["status"] in ("DEPLOY_FAILED", "UNHEALTHY") and deployment.get("message"):
            return f"{name}: {deployment['message']}"
    return None


def _wait(
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    process: subprocess.Popen,
    log_path: Path,
    problem: Callable[[], str | None] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"Ray exited ({process.returncode}) while waiting for {what}; see {log_path}")
        try:
            if ready():
                return
            message = problem() if problem else None
            if message:
                raise ServeError(f"{what} failed: {message[-3000:]}")
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ServeError(f"{what} not ready after {timeout_s:.0f} s; see {log_path}")


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
