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

The HTTP logic lives in ``RouterCore`` (no Ray) and its routes in ``asgi_app(core)``, a FastAPI app with
Pydantic request and response models (serve/ab.py): the Serve ``Router`` deployment builds one per replica
around a core over deployment handles, and tests serve one in-process. Callers are checked first (a client
or operator key, serve/callers.py: 401/403 before any body is read); bodies are then read bounded (413) and
parsed hardened (400) before FastAPI validates them against the models (422).
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations at runtime.
import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from marn.config import Config, ServeConfig, dump_config, load_config, parse_config
from serve.ab import (
    ABSummary,
    ErrorBody,
    FeedbackAccepted,
    FeedbackBody,
    Health,
    PredictBody,
    PredictResponse,
    RouterSettings,
    assign_arm,
    canary_decision,
    starting_weights,
)
from serve.callers import CallerGate, CallerKeys, resolve_callers
from serve.dashboard.history import ABHistory, HistoryRing
from serve.dashboard.page import add_dashboard
from serve.ledger_store import (
    Batch,
    EventBuffer,
    FeedbackClaim,
    FeedbackOutcome,
    LedgerStore,
    SQLiteLedgerStore,
)
from serve.scoring import ScoreRequest, ScoringError
from serve.tokens import CLOCK_SKEW_S, RequestSigner, TokenError, resolve_secret

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: 1,000 candidates plus a 1,000-item history of 256-character ids fit
MAX_NUMBER_CHARS = 40  # no field is numeric; a longer literal is hostile (int() of 5,000 digits is slow)
MAX_ERROR_DETAILS = 10
FLUSH_EVERY_S = 0.2  # the router sends its buffered events to the ledger this often
FLUSH_AT = 256  # ... or when this many are waiting
LEDGER_TIMEOUT_S = 10.0  # a ledger call waiting longer than this is given up (and retried for flushes)
# A scorer call waiting longer than this (a hung Feast or Redis read) fails like a dead replica: retried
# once, then the other arm is tried, so a request holds a router slot at most about 4x this before its 503.
SCORE_TIMEOUT_S = 10.0

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
    "response_limit": 429,
    "click_limit": 429,
}


LEDGER_REFUSALS = {
    "replayed": "feedback for this request and item was already counted",
    "response_limit": "this response already has serve.max_feedback_per_response items counted",
    "click_limit": "this response already has serve.max_clicks_per_response clicks counted",
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


def field_problems(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic's errors as {"field", "problem"}, at most MAX_ERROR_DETAILS, each cut to 300 characters."""
    return [
        {
            "field": ".".join(map(str, e["loc"][1:] if e["loc"][:1] == ("body",) else e["loc"]))[:300],
            "problem": str(e["msg"])[:300],
        }
        for e in errors[:MAX_ERROR_DETAILS]
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))  # unknown paths and methods: JSON, as every error

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "invalid request", field_problems(list(exc.errors())))


# -- the request body: read bounded and parsed hardened before FastAPI validates it against the model ------


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, read as a stream and refused (413) as soon as it passes ``max_bytes``: a chunked body
    or a lying Content-Length is never buffered past the cap. (Starlette's own body limit answers in plain
    text; every error here is JSON.)"""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 12):
        raise StarletteHTTPException(400, "invalid Content-Length")
    if declared is not None and int(declared) > max_bytes:
        raise StarletteHTTPException(413, f"request body over {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise StarletteHTTPException(413, f"request body over {max_bytes} bytes")
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


def check_media_type(content_type: str | None) -> None:
    """415 unless the body is declared ``application/json`` (a missing type too, as FastAPI's strict
    default: a cross-site form post cannot declare it); 400 for a charset other than UTF-8."""
    media, *params = (content_type or "").split(";")
    if media.strip().lower() != "application/json":
        raise StarletteHTTPException(415, f"the body must be application/json, not {media.strip()[:60]!r}")
    for param in params:
        key, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise StarletteHTTPException(400, f"the body must be UTF-8 JSON, not {charset[:40]!r}")


def parse_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes; 400 for bad UTF-8, bad JSON, NaN/Infinity, number literals over 40
    characters, nesting past the interpreter's recursion limit, or a non-object."""
    try:
        text = raw.decode("utf-8")
        data = json.loads(
            text,
            parse_int=lambda t: _number(t, int),
            parse_float=lambda t: _number(t, float),
            parse_constant=_constant,
        )
    except UnicodeDecodeError as err:
        raise StarletteHTTPException(
            400, f"the body is not UTF-8: {err.reason} at byte {err.start}"
        ) from None
    except RecursionError:
        raise StarletteHTTPException(400, "malformed JSON: nested too deeply") from None
    except ValueError as err:  # json.JSONDecodeError and the literal checks above
        raise StarletteHTTPException(400, f"malformed JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise StarletteHTTPException(400, f"expected a JSON object, got {type(data).__name__}")
    return data


class ParsedJSONRequest(Request):
    """The request with its body already read and parsed: FastAPI validates ``json()`` against the route's
    Pydantic model (422 with the failing fields) without reading or parsing it again."""

    def __init__(self, request: Request, raw: bytes, data: dict[str, Any]):
        super().__init__(request.scope, request.receive)
        self._raw, self._data = raw, data

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._data


def json_body_route(on_refused: Callable[[], None] | None = None) -> type[APIRoute]:
    """A route class whose body is checked by :func:`check_media_type` (415/400), read with
    :func:`read_body` (413) and parsed by :func:`parse_object` (400) before FastAPI validates it (422);
    ``on_refused`` is called for each of those refusals (feedback counts them as ``invalid_body``)."""

    class JSONBodyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
            validated = super().get_route_handler()

            async def handler(request: Request) -> Response:
                try:
                    check_media_type(request.headers.get("content-type"))
                    raw = await read_body(request, MAX_BODY_BYTES)
                    return await validated(ParsedJSONRequest(request, raw, parse_object(raw)))
                except (StarletteHTTPException, RequestValidationError):
                    if on_refused is not None:
                        on_refused()
                    raise

            return handler

    return JSONBodyRoute


BEARER = {"security": [{"callerKey": []}]}  # serve/callers.py: a client key, or an operator key for /ab


def declare_bearer(app: FastAPI) -> None:
    """Name the caller keys in the OpenAPI document, so /docs offers "Authorize" (CallerGate checks them)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["callerKey"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A caller key: client for /predict and /feedback, operator for /ab",
        }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


# -- the router, without Ray -------------------------------------------------------------------------------


class LedgerClient(Protocol):
    async def record(self, batch: Batch) -> bool: ...

    async def feedback(self, claim: FeedbackClaim) -> FeedbackOutcome: ...

    async def summary(self) -> dict[str, Any]: ...

    async def assignment_salt(self) -> str: ...


ScoreFn = Callable[[str, ScoreRequest], Awaitable[dict[str, Any]]]


class RouterCore:
    """Assignment, scoring with fallback, request ids, feedback checks, the event buffer and the history."""

    def __init__(
        self,
        arms: list[str],
        score: ScoreFn,
        ledger: LedgerClient,
        serve_cfg: ServeConfig,
        secret: bytes,
        callers: CallerKeys,
        history: HistoryRing | None = None,
    ):
        self.arms, self.score, self.ledger, self.callers = list(arms), score, ledger, callers
        self.salt: bytes | None = None  # the ledger's assignment salt, read at the first /predict
        # this replica's 401/403s, by reason (kept here, never in the ledger)
        self.refused_callers: Counter[str] = Counter()
        self.max_candidates, self.canary = serve_cfg.max_candidates, serve_cfg.canary
        self.signer = RequestSigner(secret, serve_cfg.feedback_window_s)
        # Weights come only from user_config (reconfigure): a router restart re-sends the live weights,
        # never the config file's, so the ledger's "since last change" counts go on.
        self.settings: RouterSettings | None = None
        self.buffer = EventBuffer(serve_cfg.max_buffered_events)
        self.history = history or HistoryRing(self.arms)
        self.flusher: asyncio.Task | None = None
        # One flush in flight: take() hands out the same unacknowledged batch until it is acknowledged, so a
        # second flush at the same time would send it again.
        self.flush_lock = asyncio.Lock()
        self.flush_due = asyncio.Event()  # FLUSH_AT events wait: the flusher sends them before its next tick
        self.background: set[asyncio.Task] = set()
        # A weight change the ledger has not been sent yet: feedback waits for it to reach the ledger first,
        # or a click counted meanwhile would land in the old step and be erased with it.
        self.weights_unsent = False
        # The summary being read from the ledger: concurrent GET /ab calls (and snapshots) share it, so a
        # flood of them costs one ledger query at a time per replica.
        self.summary_in_flight: asyncio.Task | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        settings = RouterSettings.model_validate(user_config)
        unknown = set(settings.weights) - set(self.arms)
        if unknown:
            raise ValueError(f"weights name arms {sorted(unknown)}; this app serves {self.arms}")
        weights = {arm: settings.weights.get(arm, 0.0) for arm in self.arms}  # keep the assignment order
        self.settings = RouterSettings(weights=weights, shadow=settings.shadow)
        now = time.time()
        self.buffer.add(("weights", weights, now))
        self.weights_unsent = True
        self.history.weights_changed(weights, now)
        log.info("router weights %s, shadow %s", weights, settings.shadow)

    async def predict(self, body: PredictBody) -> PredictResponse | JSONResponse:
        if len(body.candidates) > self.max_candidates:
            return error(
                422, f"at most {self.max_candidates} candidates a request, got {len(body.candidates)}"
            )
        if self.settings is None:
            return error(503, "the router has no weights yet; retry later")
        self._start_flusher()
        if self.salt is None:
            try:
                salt = await asyncio.wait_for(self.ledger.assignment_salt(), LEDGER_TIMEOUT_S)
            except Exception as err:  # the ledger restarting: no arm can be assigned consistently yet
                log.warning("ledger unavailable for the assignment salt: %r", err)
                return error(503, "the ledger is unavailable; retry later")
            self.salt = bytes.fromhex(salt)
        arm = assign_arm(body.user_id, self.settings.weights, self.salt)
        work = ScoreRequest(body.user_id, body.candidates, body.history)
        if self.settings.shadow:
            for other in self.arms:
                if other != arm:
                    self._shadow(other, work)
        answer = None
        # The assigned arm first; when it is down, the other arm answers rather than the client seeing an
        # error. Each arm tried is counted for itself: an error for one that failed, a request with its
        # own latency for the one that answered (its token then gets the feedback).
        for tried in [arm, *(other for other in self.arms if other != arm)]:
            started = time.perf_counter()
            answer = await self._score(tried, work)
            latency_ms = 1000 * (time.perf_counter() - started)
            self._event(("request", body.user_id, tried, latency_ms, answer is not None, False, time.time()))
            if answer is not None:
                break
        if answer is None:
            return error(503, "no arm could score this request; retry later")
        # Signed for the arm and version that answered (the fallback's, when the assigned arm was down).
        request_id = self.signer.issue(
            body.user_id, answer["arm"], answer["model_version"], body.candidates, time.time()
        )
        return PredictResponse(
            arm=answer["arm"],
            model_version=answer["model_version"],
            scores=answer["scores"],
            request_id=request_id,
        )

    def invalid_feedback_body(self) -> None:
        """A /feedback body refused before it reached :meth:`feedback` (4xx): counted, never in the CTR."""
        self._reject("invalid_body")

    async def feedback(self, body: FeedbackBody) -> FeedbackAccepted | JSONResponse:
        self._start_flusher()
        try:
            served = self.signer.verify(body.request_id, time.time())
        except TokenError as err:
            return self._refuse(err.reason, str(err))
        if served.user_id != body.user_id:
            return self._refuse("wrong_user", "request_id was issued for another user")
        if served.arm not in self.arms or not served.served(body.item_id):
            return self._refuse("not_served", "item_id was not a candidate of that response")
        if self.weights_unsent and not await self._flush():
            return error(503, "the ledger is unavailable; retry later")
        claim = FeedbackClaim(
            served.key,
            body.user_id,
            served.arm,
            served.model_version,
            body.item_id,
            body.clicked,
            served.issued_at,
            uuid.uuid4().hex,
        )
        try:
            outcome = await asyncio.wait_for(self.ledger.feedback(claim), LEDGER_TIMEOUT_S)
        except Exception as err:  # the ledger restarting: not counted; the client retries the same body
            log.warning("ledger unavailable for feedback: %r", err)
            return error(503, "the ledger is unavailable; retry later (a 409 on the retry means it counted)")
        if outcome != "accepted":  # counted by the ledger itself, in the claim's transaction
            return error(REJECTION_STATUS[outcome], LEDGER_REFUSALS[outcome], {"reason": outcome})
        return FeedbackAccepted(arm=served.arm)

    async def ab(self) -> ABSummary | JSONResponse:
        summary = await self._summary()
        if summary is None:
            return error(503, "the ledger is unavailable; retry later")
        if self.history.due(time.time()):
            self.history.add(summary, time.time())
        return summary

    async def ab_history(self) -> ABHistory:
        """The snapshot ring; a fresh snapshot first when the latest is older than the interval (an idle
        router has no flush loop running to take them)."""
        if self.history.due(time.time()):
            await self._snapshot()
        return self.history.view()

    async def healthz(self) -> Health:
        weights = self.settings.weights if self.settings else None
        return Health(ok=self.settings is not None, arms=self.arms, weights=weights)

    # -- internals -----------------------------------------------------------------------------------------

    async def _summary(self) -> ABSummary | None:
        """The ledger's numbers (after a flush) with this replica's weights and canary judgement; None while
        the ledger is unavailable. A caller arriving while a summary is being read gets that one (begun at
        most one ledger round trip before it asked); a caller that goes away does not cancel it for the
        others."""
        if self.summary_in_flight is None or self.summary_in_flight.done():
            self.summary_in_flight = asyncio.get_running_loop().create_task(self._read_summary())
        return await asyncio.shield(self.summary_in_flight)

    async def _read_summary(self) -> ABSummary | None:
        await self._flush()
        try:
            summary = await asyncio.wait_for(self.ledger.summary(), LEDGER_TIMEOUT_S)
        except Exception as err:  # the ledger restarting
            log.warning("ledger unavailable for the summary: %r", err)
            return None
        summary["weights"] = self.settings.weights if self.settings else None  # this replica's
        summary["shadow"] = self.settings.shadow if self.settings else None
        summary["events_buffered"] = len(self.buffer)
        summary["refused_callers"] = dict(self.refused_callers)
        if len(self.arms) == 2 and self.settings is not None:
            decision = canary_decision(summary, self.arms[0], self.arms[1], self.canary)
            summary["canary"] = {
                "steps": list(self.canary.steps),
                "next": {"action": decision.action, "weights": decision.weights, "reason": decision.reason},
            }
        return ABSummary.model_validate(summary)

    async def _snapshot(self) -> None:
        summary = await self._summary()
        if summary is not None:  # the ledger restarting: this interval has no point
            self.history.add(summary, time.time())

    def _refuse(self, reason: str, message: str) -> JSONResponse:
        self._reject(reason)
        return error(REJECTION_STATUS[reason], message, {"reason": reason})

    def _reject(self, reason: str) -> None:
        self._event(("rejected", reason, time.time()))

    async def _score(self, arm: str, work: ScoreRequest) -> dict[str, Any] | None:
        """The arm's answer; one retry (Serve routes it to another replica when one died), else None. No
        answer within SCORE_TIMEOUT_S is a failure too: a hung read must not hold the router's slots."""
        for attempt in range(2):
            try:
                return dict(await asyncio.wait_for(self.score(arm, work), SCORE_TIMEOUT_S))
            except TimeoutError:
                log.warning(
                    "%s scorer gave no answer in %g s (attempt %d)", arm, SCORE_TIMEOUT_S, attempt + 1
                )
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
            # Wakes the one flusher: a burst asks for one flush, never one per event.
            self._start_flusher()
            self.flush_due.set()

    async def _flush(self) -> bool:
        """Send what is buffered; a batch the ledger did not acknowledge is resent (with its id) next time.
        A flush asked for while one runs waits for it (the running one sends what arrives meanwhile too).
        False when the ledger is unavailable."""
        async with self.flush_lock:
            while (batch := self.buffer.take()) is not None:
                try:
                    await asyncio.wait_for(self.ledger.record(batch), LEDGER_TIMEOUT_S)
                except Exception as err:  # the ledger restarting: the batch stays for the next flush
                    log.warning("ledger unavailable, %d events kept: %r", len(self.buffer), err)
                    return False
                self.buffer.acknowledged(batch)
            self.weights_unsent = False  # everything buffered so far reached the ledger
        return True

    def _start_flusher(self) -> None:
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # every FLUSH_EVERY_S, or as soon as FLUSH_AT events wait
                await asyncio.wait_for(self.flush_due.wait(), FLUSH_EVERY_S)
            self.flush_due.clear()
            if not await self._flush():
                await asyncio.sleep(FLUSH_EVERY_S)  # the ledger is down: retried each tick, not per event
            if self.history.due(time.time()):
                await self._snapshot()


def asgi_app(core: RouterCore) -> FastAPI:
    """The service's HTTP routes over ``core``: each Serve router replica builds one around its core, and
    tests and tools serve one in this process. OpenAPI at /openapi.json, Swagger UI at /docs (its assets
    from the fastapi-offline package: no CDN), the dashboard at /dashboard."""
    app = FastAPIOffline(
        title="MARN A/B serving",
        version="1",
        description="Sticky weighted A/B between the arms; the contract is docs/design.md's.",
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs/static",
    )
    install_error_handlers(app)
    app.router.add_api_route(  # the router's method: the app's has no route_class_override
        "/predict",
        core.predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=_errors(400, 401, 403, 413, 415, 422, 503),
        openapi_extra=BEARER,
        route_class_override=json_body_route(),
        summary="Score candidates for a user on the user's arm",
    )
    app.router.add_api_route(
        "/feedback",
        core.feedback,
        methods=["POST"],
        status_code=202,
        response_model=FeedbackAccepted,
        responses=_errors(400, 401, 403, 409, 410, 413, 415, 422, 429, 503),
        openapi_extra=BEARER,
        route_class_override=json_body_route(core.invalid_feedback_body),
        summary="Count a click (or a view without one) on an item a /predict answer served",
    )
    app.get(
        "/ab",
        response_model=ABSummary,
        responses=_errors(401, 403, 503),
        openapi_extra=BEARER,
        summary="Per-arm numbers, the canary's move",
    )(core.ab)
    app.get(
        "/ab/history",
        response_model=ABHistory,
        responses=_errors(401, 403),
        openapi_extra=BEARER,
        summary="This router replica's ring of /ab snapshots (the dashboard's)",
    )(core.ab_history)
    app.get("/healthz", response_model=Health)(core.healthz)
    add_dashboard(app)
    declare_bearer(app)
    app.add_middleware(
        CallerGate,
        keys=core.callers,
        on_refused=lambda reason: core.refused_callers.update([reason]),
        refuse=error,
    )
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

    async def assignment_salt(self) -> str:
        return self.store.assignment_salt()


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

    async def assignment_salt(self) -> str:
        return await self.handle.assignment_salt.remote()


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
    async def score(self, requests: list[ScoreRequest]) -> list[dict[str, Any] | ScoringError]:
        # A request that failed gets its own ScoringError (the router raises it); the others their scores.
        results = self.scorer.score_each(requests, now_us=time.time_ns() // 1000)
        served = {"arm": self.arm, "model_version": self.version}
        return [r if isinstance(r, ScoringError) else {**served, "scores": r} for r in results]


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class Ledger:
    """The single place A/B counts live, so every router replica reports into one set of numbers. Its state
    is the SQLite file: a replacement replica (after a crash or ``ray.kill``) goes on from the last commit."""

    def __init__(self, arms: list[str], config: str):
        cfg = parse_config(config)
        # The replay set must outlive the window plus the clock skew a request id may have.
        self.store = SQLiteLedgerStore(
            ledger_path(cfg),
            arms,
            cfg.serve.feedback_window_s + CLOCK_SKEW_S,
            cfg.serve.ledger_max_events,
            cfg.serve.max_feedback_per_response,
            cfg.serve.max_clicks_per_response,
        )

    # Every method is async, so they all run on the replica's one event loop: the SQLite connection is
    # never used from two threads (Serve runs sync methods in a thread pool).
    async def record(self, batch: Batch) -> bool:
        return self.store.apply(batch)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def feedback(self, claims: list[FeedbackClaim]) -> list[FeedbackOutcome]:
        return self.store.claim_feedback(claims)  # one transaction for the whole micro-batch

    async def summary(self) -> dict[str, Any]:
        return self.store.summary()

    async def assignment_salt(self) -> str:
        return self.store.assignment_salt()


@serve.deployment(max_ongoing_requests=128, health_check_period_s=5)
@serve.ingress()
class Router:
    """Sticky weighted A/B between the arms; ``user_config`` = RouterSettings (weights, shadow). Its HTTP
    app is :func:`asgi_app` over this replica's core, built by Serve after ``__init__``."""

    def __init__(self, scorers: dict[str, DeploymentHandle], ledger: DeploymentHandle, config: str):
        cfg = parse_config(config)
        self.scorers = scorers
        self.core = RouterCore(
            list(scorers),
            self._score_remote,
            HandleLedger(ledger),
            cfg.serve,
            resolve_secret(cfg.serve.secret_env),
            resolve_callers(cfg.serve.callers_env),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return asgi_app(self.core)

    async def _score_remote(self, arm: str, work: ScoreRequest) -> dict[str, Any]:
        answer = await self.scorers[arm].score.remote(work)
        if isinstance(answer, ScoringError):  # this request failed alone; its batch-mates were scored
            raise answer
        return answer

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.core.reconfigure(user_config)


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
