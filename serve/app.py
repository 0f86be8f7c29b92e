"""The Ray Serve A/B application: router -> one scorer per arm (MARN, DUPN) -> Feast online lookups.

    HTTP (127.0.0.1:8000 locally)
      |
    router (ingress; sticky weighted assignment; weights + shadow in user_config, changed live;
      |     signs a request_id per answer, checks it on feedback)
      |------------------------------|                  request events (buffered) + feedback claims
    marn_scorer                  dupn_scorer   ------------------------------------------> ab_ledger
    (@serve.batch; Feast:        (@serve.batch; Feast: sequence,            (one replica over a SQLite
     sequence + precomputed       full forward per candidate)                file: counts, event log,
     item representations)                                                   replay set; survives it)

``build_app`` is the import path Serve configs (``marn serve up``, KubeRay's RayService) name:
``serve.app:build_app`` with args ``{"config": PATH}``. The HTTP contract is the README's.

The HTTP logic lives in ``RouterCore`` (no Ray), so ``asgi_app`` can serve it in-process for tests; the
Serve ``Router`` deployment wraps one core around deployment handles.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime.
import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from marn.config import Config, ServeConfig, dump_config, load_config, parse_config
from serve.ab import (
    FeedbackBody,
    PredictBody,
    RouterSettings,
    assign_arm,
    canary_decision,
    starting_weights,
)
from serve.ledger_store import (
    Batch,
    EventBuffer,
    FeedbackClaim,
    FeedbackOutcome,
    LedgerStore,
    SQLiteLedgerStore,
)
from serve.scoring import ScoreRequest
from serve.tokens import CLOCK_SKEW_S, RequestSigner, TokenError, resolve_secret

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 candidates plus a 1,000-item history of 256-character ids fit
MAX_NUMBER_CHARS = 40  # no field is numeric; a longer literal is hostile (int() of 5,000 digits is slow)
MAX_ERROR_DETAILS = 10
FLUSH_EVERY_S = 0.2  # the router sends its buffered events to the ledger this often
FLUSH_AT = 256  # ... or when this many are waiting
LEDGER_TIMEOUT_S = 10.0  # a ledger call waiting longer than this is given up (and retried for flushes)

# Feedback refused, by reason: the status code and where it is counted (GET /ab "rejected_feedback").
REJECTION_STATUS = {
    "invalid_body": 422,
    "malformed": 400,
    "forged": 403,
    "clock_skew": 403,
    "wrong_user": 403,
    "expired": 410,
    "not_served": 422,
    "replayed": 409,
}


class ErrorResponse(JSONResponse):
    """A JSON error; ASCII-escaped, so hostile text echoed back (a lone surrogate) still renders."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error(status: int, message: str, details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if details is not None:
        body["details"] = details
    return ErrorResponse(body, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))  # unknown paths and methods: JSON, as every error

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "invalid request", [str(e.get("msg")) for e in exc.errors()])


api = FastAPI(title="MARN A/B serving", docs_url=None, redoc_url=None)
install_error_handlers(api)


# -- the request body ------------------------------------------------------------------------------------


async def read_body(request: Request, max_bytes: int) -> bytes | JSONResponse:
    """The raw body, read as a stream and refused (413) as soon as it passes ``max_bytes``: a chunked body
    or a lying Content-Length is never buffered past the cap."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 12):
        return error(400, "invalid Content-Length")
    if declared is not None and int(declared) > max_bytes:
        return error(413, f"request body over {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return error(413, f"request body over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _number(text: str, convert: Callable[[str], Any]) -> Any:
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(f"number literal of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    value = convert(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_object(raw: bytes, content_type: str | None) -> dict[str, Any] | JSONResponse:
    """A JSON object from UTF-8 bytes; 400 for another charset, bad UTF-8, bad JSON, NaN/Infinity, number
    literals over 40 characters, nesting past the interpreter's recursion limit, or a non-object."""
    charset = _charset(content_type)
    if charset not in (None, "utf-8", "utf8"):
        return error(400, f"the body must be UTF-8 JSON, not {charset[:40]!r}")
    try:
        text = raw.decode("utf-8")
        data = json.loads(
            text,
            parse_int=lambda t: _number(t, int),
            parse_float=lambda t: _number(t, float),
            parse_constant=_constant,
        )
    except UnicodeDecodeError as err:
        return error(400, f"the body is not UTF-8: {err.reason} at byte {err.start}")
    except RecursionError:
        return error(400, "malformed JSON: nested too deeply")
    except ValueError as err:  # json.JSONDecodeError and the literal checks above
        return error(400, f"malformed JSON: {str(err)[:200]}")
    if not isinstance(data, dict):
        return error(400, f"expected a JSON object, got {type(data).__name__}")
    return data


def _charset(content_type: str | None) -> str | None:
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


async def read_json(request: Request, schema: type, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request body validated against ``schema``, or the JSONResponse (4xx) that explains why not."""
    raw = await read_body(request, max_bytes)
    if isinstance(raw, JSONResponse):
        return raw
    data = parse_object(raw, request.headers.get("content-type"))
    if isinstance(data, JSONResponse):
        return data
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        details = [
            {"field": ".".join(map(str, e["loc"]))[:300], "problem": e["msg"][:300]}
            for e in err.errors()[:MAX_ERROR_DETAILS]
        ]
        return error(422, "invalid request", details)


# -- the router, without Ray -------------------------------------------------------------------------------


class LedgerClient(Protocol):
    async def record(self, batch: Batch) -> bool: ...

    async def feedback(self, claim: FeedbackClaim) -> FeedbackOutcome: ...

    async def summary(self) -> dict[str, Any]: ...


ScoreFn = Callable[[str, ScoreRequest], Awaitable[dict[str, Any]]]


class RouterCore:
    """Assignment, scoring with fallback, request ids, feedback checks and the event buffer."""

    def __init__(
        self, arms: list[str], score: ScoreFn, ledger: LedgerClient, serve_cfg: ServeConfig, secret: bytes
    ):
        self.arms, self.score, self.ledger = list(arms), score, ledger
        self.max_candidates, self.canary = serve_cfg.max_candidates, serve_cfg.canary
        self.signer = RequestSigner(secret, serve_cfg.feedback_window_s)
        # Weights come only from user_config (reconfigure): a router restart re-sends the live weights,
        # never the config file's, so the ledger's "since last change" counts go on.
        self.settings: RouterSettings | None = None
        self.buffer = EventBuffer(serve_cfg.max_buffered_events)
        self.flusher: asyncio.Task | None = None
        self.background: set[asyncio.Task] = set()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = RouterSettings.model_validate(user_config)
        unknown = set(settings.weights) - set(self.arms)
        if unknown:
            raise ValueError(f"weights name arms {sorted(unknown)}; this app serves {self.arms}")
        weights = {arm: settings.weights.get(arm, 0.0) for arm in self.arms}  # keep the assignment order
        self.settings = RouterSettings(weights=weights, shadow=settings.shadow)
        self.buffer.add(("weights", weights, time.time()))
        log.info("router weights %s, shadow %s", weights, settings.shadow)

    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = await read_json(request, PredictBody)
        if isinstance(body, JSONResponse):
            return body
        if len(body.candidates) > self.max_candidates:
            return error(
                422, f"at most {self.max_candidates} candidates a request, got {len(body.candidates)}"
            )
        if self.settings is None:
            return error(503, "the router has no weights yet; retry later")
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
        self._event(("request", body.user_id, arm, latency_ms, answer is not None, False, time.time()))
        if answer is None:
            return error(503, "no arm could score this request; retry later")
        # Signed for the arm and version that answered (the fallback's, when the assigned arm was down).
        answer["request_id"] = self.signer.issue(
            body.user_id, answer["arm"], answer["model_version"], body.candidates, time.time()
        )
        return JSONResponse(answer)

    async def feedback(self, request: Request) -> JSONResponse:
        body = await read_json(request, FeedbackBody)
        if isinstance(body, JSONResponse):
            self._reject("invalid_body")
            return body
        self._start_flusher()
        try:
            served = self.signer.verify(body.request_id, time.time())
        except TokenError as err:
            return self._refuse(err.reason, str(err))
        if served.user_id != body.user_id:
            return self._refuse("wrong_user", "request_id was issued for another user")
        if served.arm not in self.arms or not served.served(body.item_id):
            return self._refuse("not_served", "item_id was not a candidate of that response")
        claim = FeedbackClaim(
            served.key,
            body.user_id,
            served.arm,
            served.model_version,
            body.item_id,
            body.clicked,
            served.issued_at,
        )
        try:
            outcome = await asyncio.wait_for(self.ledger.feedback(claim), LEDGER_TIMEOUT_S)
        except Exception as err:  # the ledger restarting: not counted; the client retries the same body
            log.warning("ledger unavailable for feedback: %r", err)
            return error(503, "the ledger is unavailable; retry later (a 409 on the retry means it counted)")
        if outcome == "replayed":  # counted by the ledger itself, in the claim's transaction
            return error(
                REJECTION_STATUS["replayed"], "feedback for this request and item was already counted"
            )
        return JSONResponse({"accepted": True, "arm": served.arm}, status_code=202)

    async def ab(self) -> JSONResponse:
        await self._flush()
        try:
            summary = await asyncio.wait_for(self.ledger.summary(), LEDGER_TIMEOUT_S)
        except Exception as err:  # the ledger restarting
            log.warning("ledger unavailable for the summary: %r", err)
            return error(503, "the ledger is unavailable; retry later")
        summary["weights"] = self.settings.weights if self.settings else None  # this replica's
        summary["shadow"] = self.settings.shadow if self.settings else None
        summary["events_buffered"] = len(self.buffer)
        if len(self.arms) == 2 and self.settings is not None:
            decision = canary_decision(summary, self.arms[0], self.arms[1], self.canary)
            summary["canary"] = {
                "steps": list(self.canary.steps),
                "next": {"action": decision.action, "weights": decision.weights, "reason": decision.reason},
            }
        return JSONResponse(summary)

    async def healthz(self) -> JSONResponse:
        weights = self.settings.weights if self.settings else None
        return JSONResponse({"ok": self.settings is not None, "arms": self.arms, "weights": weights})

    # -- internals -----------------------------------------------------------------------------------------

    def _refuse(self, reason: str, message: str) -> JSONResponse:
        self._reject(reason)
        return error(REJECTION_STATUS[reason], message, {"reason": reason})

    def _reject(self, reason: str) -> None:
        self._event(("rejected", reason, time.time()))

    async def _score(self, arm: str, work: ScoreRequest) -> dict[str, Any] | None:
        """The arm's answer; one retry (Serve routes it to another replica when one died), else None."""
        for attempt in range(2):
            try:
                return dict(await self.score(arm, work))
            except Exception as err:  # a dead replica or a scorer error: counted, never a 500 to the client
                log.warning("%s scorer failed (attempt %d): %r", arm, attempt + 1, err)
        return None

    def _shadow(self, arm: str, work: ScoreRequest) -> None:
        async def run() -> None:
            started = time.perf_counter()
            answer = await self._score(arm, work)
            latency_ms = 1000 * (time.perf_counter() - started)
            self._event(("request", work.user_id, arm, latency_ms, answer is not None, True, time.time()))

        self._background(run())

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _event(self, event: tuple) -> None:
        self.buffer.add(event)
        if len(self.buffer) >= FLUSH_AT:
            self._background(self._flush())

    async def _flush(self) -> None:
        """Send what is buffered; a batch the ledger did not acknowledge is resent (with its id) next time."""
        while (batch := self.buffer.take()) is not None:
            try:
                await asyncio.wait_for(self.ledger.record(batch), LEDGER_TIMEOUT_S)
            except Exception as err:  # the ledger restarting: the batch stays for the next flush
                log.warning("ledger unavailable, %d events kept: %r", len(self.buffer), err)
                return
            self.buffer.acknowledged(batch)

    def _start_flusher(self) -> None:
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self._flush()


def asgi_app(core: RouterCore) -> FastAPI:
    """The same HTTP routes as the Serve router, over ``core`` in this process (tests, tools)."""
    app = FastAPI(title="MARN A/B serving (in-process)", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.post("/predict")(core.predict)
    app.post("/feedback")(core.feedback)
    app.get("/ab")(core.ab)
    app.get("/healthz")(core.healthz)
    return app


class LocalLedger:
    """A LedgerClient over a store in this process (Serve's ``Ledger`` deployment does this remotely)."""

    def __init__(self, store: LedgerStore):
        self.store = store

    async def record(self, batch: Batch) -> bool:
        return self.store.apply(batch)

    async def feedback(self, claim: FeedbackClaim) -> FeedbackOutcome:
        return self.store.claim_feedback([claim])[0]

    async def summary(self) -> dict[str, Any]:
        return self.store.summary()


class HandleLedger:
    """A LedgerClient over the ``ab_ledger`` deployment."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def record(self, batch: Batch) -> bool:
        return await self.handle.record.remote(batch)

    async def feedback(self, claim: FeedbackClaim) -> FeedbackOutcome:
        return await self.handle.feedback.remote(claim)

    async def summary(self) -> dict[str, Any]:
        return await self.handle.summary.remote()


def ledger_path(cfg: Config) -> Path:
    return cfg.serve.ledger_path or cfg.paths.work_dir / "serve" / "ledger.sqlite"


# -- Serve deployments ----------------------------------------------------------------------------------


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
    """The single place A/B counts live, so every router replica reports into one set of numbers. Its state
    is the SQLite file: a replacement replica (after a crash or ``ray.kill``) goes on from the last commit."""

    def __init__(self, arms: list[str], config: str):
        cfg = parse_config(config)
        # The replay set must outlive the window plus the clock skew a request id may have.
        self.store = SQLiteLedgerStore(ledger_path(cfg), arms, cfg.serve.feedback_window_s + CLOCK_SKEW_S)

    # Every method is async, so they all run on the replica's one event loop: the SQLite connection is
    # never used from two threads (Serve runs sync methods in a thread pool).
    async def record(self, batch: Batch) -> bool:
        return self.store.apply(batch)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def feedback(self, claims: list[FeedbackClaim]) -> list[FeedbackOutcome]:
        return self.store.claim_feedback(claims)  # one transaction for the whole micro-batch

    async def summary(self) -> dict[str, Any]:
        return self.store.summary()


@serve.deployment(max_ongoing_requests=128, health_check_period_s=5)
@serve.ingress(api)
class Router:
    """Sticky weighted A/B between the arms; ``user_config`` = RouterSettings (weights, shadow)."""

    def __init__(self, scorers: dict[str, DeploymentHandle], ledger: DeploymentHandle, config: str):
        cfg = parse_config(config)
        self.scorers = scorers
        self.core = RouterCore(
            list(scorers),
            self._score_remote,
            HandleLedger(ledger),
            cfg.serve,
            resolve_secret(cfg.serve.secret_env),
        )

    async def _score_remote(self, arm: str, work: ScoreRequest) -> dict[str, Any]:
        return await self.scorers[arm].score.remote(work)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(user_config)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        return await self.core.predict(request)

    @api.post("/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        return await self.core.feedback(request)

    @api.get("/ab")
    async def ab(self) -> JSONResponse:
        return await self.core.ab()

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return await self.core.healthz()


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
    ledger = Ledger.options(name="ab_ledger", ray_actor_options={"num_cpus": 0.05}).bind(arms, text)
    return Router.options(
        name="router",
        num_replicas=cfg.serve.router_replicas,
        ray_actor_options={"num_cpus": cfg.serve.router_cpus},
        user_config={"weights": starting_weights(arms, cfg.serve.weights), "shadow": cfg.serve.shadow},
    ).bind(scorers, ledger, text)
