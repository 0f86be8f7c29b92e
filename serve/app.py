"""The Ray Serve A/B application: router -> one scorer per arm (MARN, DUPN) -> Feast online lookups.

    HTTP (127.0.0.1:8000 locally)
      |
    router (ingress; sticky weighted assignment; weights + shadow in user_config, changed live)
      |------------------------------|                      events (requests, feedback, weight changes)
    marn_scorer                  dupn_scorer   ------------------------------------------> ab_ledger
    (@serve.batch; Feast:        (@serve.batch; Feast: sequence,                     (one replica: counts,
     sequence + precomputed       full forward per candidate)                          latency, CTR, test)
     item representations)

``build_app`` is the import path Serve configs (``marn serve up``, KubeRay's RayService) name:
``serve.app:build_app`` with args ``{"config": PATH}``. The HTTP contract is DESIGN.md's.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from marn.config import Config, dump_config, load_config, parse_config
from serve.ab import (
    ABLedger,
    FeedbackBody,
    PredictBody,
    RouterSettings,
    assign_arm,
    canary_decision,
    starting_weights,
)
from serve.scoring import ScoreRequest

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 candidates plus a 1,000-item history of 256-character ids fit
FLUSH_EVERY_S = 0.2  # the router sends its buffered events to the ledger this often
FLUSH_AT = 256  # ... or when this many are waiting

api = FastAPI(title="MARN A/B serving", docs_url=None, redoc_url=None)


def error(status: int, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))  # unknown paths and methods: JSON, as every error


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, "invalid request", [str(e.get("msg")) for e in exc.errors()])


async def read_json(request: Request, schema: type, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request body validated against ``schema``, or the JSONResponse (4xx) that explains why not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return error(413, f"request body over {max_bytes} bytes")
    raw = await request.body()
    if len(raw) > max_bytes:
        return error(413, f"request body over {max_bytes} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return error(400, f"malformed JSON: {err}")
    if not isinstance(data, dict):
        return error(400, f"expected a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        details = [{"field": ".".join(map(str, e["loc"])), "problem": e["msg"]} for e in err.errors()]
        return error(422, "invalid request", details)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=5)
class Scorer:
    """One arm: the champion model of ``arm`` in the registry, scoring micro-batches of requests."""

    def __init__(self, arm: str, config: str):
        import torch

        from marn.registry import champion
        from marn.stages import registry_dir, work_path
        from serve.features import FeatureFetcher
        from serve.scoring import ArmScorer

        torch.set_num_threads(1)  # replicas share 2 cores; one intra-op thread each avoids oversubscription
        cfg = parse_config(config)
        current = champion(registry_dir(cfg), arm)
        if current is None:
            raise FileNotFoundError(
                f"no registered {arm!r} model in {registry_dir(cfg)}: run the pipeline first"
            )
        self.arm, self.version = arm, current.version
        fetcher = FeatureFetcher(work_path(cfg, cfg.feast.repo_dir, "feast"), cfg.serve.item_cache_s)
        self.scorer = ArmScorer(current.checkpoint, fetcher, cfg.samples.max_history)
        self.score.set_max_batch_size(cfg.serve.max_batch_size)
        self.score.set_batch_wait_timeout_s(cfg.serve.batch_wait_s)
        log.info("%s scorer: %s %s from %s", arm, self.scorer.name, self.version, current.path)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def score(self, requests: list[ScoreRequest]) -> list[dict[str, Any]]:
        scores = self.scorer.score(requests, now_us=time.time_ns() // 1000)
        return [{"arm": self.arm, "model_version": self.version, "scores": s} for s in scores]


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class Ledger:
    """The single place A/B counts live, so every router replica reports into one set of numbers."""

    def __init__(self, arms: list[str]):
        self.ledger = ABLedger(arms)

    def record(self, events: list[tuple]) -> None:
        for kind, payload in events:  # in the order the router saw them: a feedback after its request
            if kind == "request":
                self.ledger.record_requests([payload])
            elif kind == "feedback":
                self.ledger.record_feedback(*payload)
            elif kind == "weights":
                self.ledger.weights_changed(payload)

    def summary(self) -> dict[str, Any]:
        return self.ledger.summary()


@serve.deployment(max_ongoing_requests=128, health_check_period_s=5)
@serve.ingress(api)
class Router:
    """Sticky weighted A/B between the arms; ``user_config`` = RouterSettings (weights, shadow)."""

    def __init__(self, scorers: dict[str, DeploymentHandle], ledger: DeploymentHandle, config: str):
        cfg = parse_config(config)
        self.scorers, self.ledger = scorers, ledger
        self.arms = list(scorers)
        self.max_candidates, self.canary = cfg.serve.max_candidates, cfg.serve.canary
        self.settings = RouterSettings(
            weights=starting_weights(self.arms, cfg.serve.weights), shadow=cfg.serve.shadow
        )
        self.events: list[tuple] = [("weights", self.settings.weights)]
        self.flusher: asyncio.Task | None = None
        self.background: set[asyncio.Task] = set()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = RouterSettings.model_validate(user_config)
        unknown = set(settings.weights) - set(self.arms)
        if unknown:
            raise ValueError(f"weights name arms {sorted(unknown)}; this app serves {self.arms}")
        weights = {arm: settings.weights.get(arm, 0.0) for arm in self.arms}  # keep the assignment order
        self.settings = RouterSettings(weights=weights, shadow=settings.shadow)
        self.events.append(("weights", weights))
        log.info("router weights %s, shadow %s", weights, settings.shadow)

    # -- HTTP --------------------------------------------------------------------------------------------

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = await read_json(request, PredictBody)
        if isinstance(body, JSONResponse):
            return body
        if len(body.candidates) > self.max_candidates:
            return error(
                422, f"at most {self.max_candidates} candidates a request, got {len(body.candidates)}"
            )
        self._start_flusher()
        arm = assign_arm(body.user_id, self.settings.weights)
        work = ScoreRequest(body.user_id, body.candidates, body.history)
        if self.settings.shadow:
            for other in self.arms:
                if other != arm:
                    self._shadow(other, work)
        answer = await self._score(arm, work)
        if answer is None:  # the arm is down: the other arm answers rather than the client seeing an error
            for other in self.arms:
                if other != arm:
                    answer = await self._score(other, work)
                    if answer is not None:
                        break
        latency_ms = 1000 * (time.perf_counter() - started)
        self._event("request", (body.user_id, arm, latency_ms, answer is not None, False))
        if answer is None:
            return error(503, "no arm could score this request; retry later")
        return JSONResponse(answer)

    @api.post("/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        body = await read_json(request, FeedbackBody)
        if isinstance(body, JSONResponse):
            return body
        self._start_flusher()
        fallback = assign_arm(body.user_id, self.settings.weights)
        self._event("feedback", (body.user_id, body.clicked, fallback))
        return JSONResponse({"accepted": True}, status_code=202)

    @api.get("/ab")
    async def ab(self) -> JSONResponse:
        await self._flush()
        summary = await self.ledger.summary.remote()
        summary["weights"] = self.settings.weights  # this replica's: the ledger's may trail by one flush
        summary["shadow"] = self.settings.shadow
        if len(self.arms) == 2:
            decision = canary_decision(summary, self.arms[0], self.arms[1], self.canary)
            summary["canary"] = {
                "steps": list(self.canary.steps),
                "next": {"action": decision.action, "weights": decision.weights, "reason": decision.reason},
            }
        return JSONResponse(summary)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"ok": True, "arms": self.arms, "weights": self.settings.weights})

    # -- internals -----------------------------------------------------------------------------------------

    async def _score(self, arm: str, work: ScoreRequest) -> dict[str, Any] | None:
        """The arm's answer; one retry (Serve routes it to another replica when one died), else None."""
        for attempt in range(2):
            try:
                return await self.scorers[arm].score.remote(work)
            except Exception as err:  # a dead replica or a scorer error: counted, never a 500 to the client
                log.warning("%s scorer failed (attempt %d): %r", arm, attempt + 1, err)
        return None

    def _shadow(self, arm: str, work: ScoreRequest) -> None:
        async def run() -> None:
            started = time.perf_counter()
            answer = await self._score(arm, work)
            self._event(
                "request",
                (work.user_id, arm, 1000 * (time.perf_counter() - started), answer is not None, True),
            )

        task = asyncio.get_running_loop().create_task(run())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _event(self, kind: str, payload: tuple) -> None:
        self.events.append((kind, payload))
        if len(self.events) >= FLUSH_AT:
            task = asyncio.get_running_loop().create_task(self._flush())
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def _flush(self) -> None:
        if self.events:
            events, self.events = self.events, []
            try:
                await self.ledger.record.remote(events)
            except Exception as err:  # the ledger restarting: keep the events for the next flush
                log.warning("ledger unavailable, %d events kept: %r", len(events), err)
                self.events = events + self.events

    def _start_flusher(self) -> None:
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self._flush()


def build_app(args: dict[str, str]) -> Application:
    """The A/B app for the config at ``args["config"]`` (default: the built-in local config)."""
    unknown = set(args) - {"config"}
    if unknown:
        raise ValueError(f"unknown build_app args {sorted(unknown)}; expected only 'config'")
    return build_app_from_config(load_config(Path(args["config"]) if args.get("config") else None))


def build_app_from_config(cfg: Config) -> Application:
    text = dump_config(cfg)
    arms = [cfg.pipeline.model, cfg.pipeline.baseline]
    scorers = {
        arm: Scorer.options(
            name=f"{arm}_scorer",
            num_replicas=cfg.serve.scorer_replicas,
            ray_actor_options={"num_cpus": cfg.serve.scorer_cpus},
        ).bind(arm, text)
        for arm in arms
    }
    ledger = Ledger.options(name="ab_ledger", ray_actor_options={"num_cpus": 0.05}).bind(arms)
    return Router.options(
        name="router",
        num_replicas=cfg.serve.router_replicas,
        ray_actor_options={"num_cpus": cfg.serve.router_cpus},
        user_config={"weights": starting_weights(arms, cfg.serve.weights), "shadow": cfg.serve.shadow},
    ).bind(scorers, ledger, text)
