"""A/B traffic logic without Ray: sticky assignment, the per-arm ledger, the CTR test and the canary ramp.

Assignment hashes the user id, keyed with the experiment's secret salt, to a point u in [0, 1) and walks
the arms' cumulative weights in their configured order, the candidate first. A user therefore keeps an arm
while weights stay put, and when the candidate's share grows from 5% to 25% the first 5% of users stay in it
(a ramp moves users one way). The salt (the ledger's, made with it: one per experiment) keeps anyone
outside from working out a user's arm offline, and a new experiment from starting with the same users first.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from marn.config import CanaryConfig
from serve.sequential import ArmSample, ClusterSums, ctr_difference, sequential_ctr_test, stage_alpha

LATENCY_WINDOW = 20_000  # latest latencies kept per arm for the percentiles
REMEMBERED_USERS = 200_000  # user -> last arm served, to credit feedback to the arm that was shown


class RouterSettings(BaseModel):
    """The router's ``user_config``: changed live (a lightweight Serve update, no replica restarts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, float]  # arm -> traffic share, in assignment order (the candidate first)
    shadow: bool = False  # also score on the other arm; answer from the assigned one

    @field_validator("weights")
    @classmethod
    def _shares(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights or any(not (0 <= w <= 1) or math.isnan(w) for w in weights.values()):
            raise ValueError(f"weights must be shares in [0, 1], got {weights}")
        if abs(sum(weights.values()) - 1) > 1e-6:
            raise ValueError(f"weights must sum to 1, got {sum(weights.values())} from {weights}")
        return weights


SALT_BYTES = 32


def new_salt() -> str:
    return secrets.token_hex(SALT_BYTES)


def user_point(user_id: str, salt: bytes) -> float:
    """A stable point in [0, 1) per user id and salt (keyed blake2b: the same on every replica, process and
    machine; unpredictable without the salt)."""
    if len(salt) < 16:
        raise ValueError(f"the assignment salt must be at least 16 bytes, got {len(salt)}")
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8, key=salt[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_arm(user_id: str, weights: dict[str, float], salt: bytes) -> str:
    """The user's arm under ``weights`` (see the module docstring)."""
    point, edge = user_point(user_id, salt), 0.0
    arms = [arm for arm, w in weights.items() if w > 0]
    for arm in arms:
        edge += weights[arm]
        if point < edge:
            return arm
    return arms[-1]  # point within float rounding of 1


def ctr_test(clicks_a: int, shown_a: int, clicks_b: int, shown_b: int) -> dict[str, float | None]:
    """Two-proportion z-test of CTR a against CTR b: z, two-sided p and one-sided p that a < b.

    Valid for one look at a fixed sample of independent events (the offline replay) only: the canary,
    which looks again and again at clustered feedback, uses :func:`canary_decision`."""
    if min(shown_a, shown_b) == 0:
        return {"z": None, "p_two_sided": None, "p_a_lower": None}
    pooled = (clicks_a + clicks_b) / (shown_a + shown_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / shown_a + 1 / shown_b))
    if se == 0:
        return {"z": 0.0, "p_two_sided": 1.0, "p_a_lower": 0.5}
    z = (clicks_a / shown_a - clicks_b / shown_b) / se
    return {
        "z": z,
        "p_two_sided": math.erfc(abs(z) / math.sqrt(2)),
        "p_a_lower": 0.5 * math.erfc(-z / math.sqrt(2)),
    }


@dataclass
class ArmCounters:
    requests: int = 0
    errors: int = 0
    shown: int = 0  # feedback events
    clicks: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    clusters: ClusterSums = field(default_factory=ClusterSums)  # per-user sums: the canary's variance

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        percentiles = (
            {f"p{q}": float(np.percentile(lat, q)) for q in (50, 95, 99)}
            if len(lat)
            else dict.fromkeys(("p50", "p95", "p99"))
        )
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms": percentiles,
            "feedback": self.shown,
            "clicks": self.clicks,
            "ctr": self.clicks / self.shown if self.shown else None,
            "clusters": self.clusters.summary(),
        }


class ABLedger:
    """Per-arm counts since the start and since the last weight change (the canary judges the latter)."""

    def __init__(self, arms: list[str]):
        self.arms = list(arms)
        self.total = {arm: ArmCounters() for arm in arms}
        self.step = {arm: ArmCounters() for arm in arms}
        self.shadow = {arm: ArmCounters() for arm in arms}  # requests scored in the shadow of the other arm
        self.weights: dict[str, float] | None = None
        self.last_arm: OrderedDict[str, str] = OrderedDict()

    def record_requests(self, records: list[tuple[str, str, float, bool, bool]]) -> None:
        """(user_id, arm, latency ms, ok, shadow) per request."""
        for user_id, arm, latency_ms, ok, shadow in records:
            counters = [self.shadow[arm]] if shadow else [self.total[arm], self.step[arm]]
            for c in counters:
                c.requests += 1
                c.errors += not ok
                if ok:
                    c.latencies_ms.append(latency_ms)
            if not shadow and ok:
                self.last_arm[user_id] = arm
                self.last_arm.move_to_end(user_id)
                if len(self.last_arm) > REMEMBERED_USERS:
                    self.last_arm.popitem(last=False)

    def record_feedback(self, user_id: str, clicked: bool, fallback_arm: str) -> str:
        """Credit the arm the user was last served by (``fallback_arm`` if none); returns that arm."""
        arm = self.last_arm.get(user_id, fallback_arm)
        for c in (self.total[arm], self.step[arm]):
            c.shown += 1
            c.clicks += bool(clicked)
            c.clusters.add(user_id, clicked)
        return arm

    def weights_changed(self, weights: dict[str, float]) -> None:
        if weights != self.weights:
            if self.weights is not None:
                self.step = {arm: ArmCounters() for arm in self.arms}
            self.weights = dict(weights)

    def summary(self) -> dict[str, Any]:
        candidate, baseline = self.arms[0], self.arms[-1]
        t, s = self.total, self.step
        return {
            "weights": self.weights,
            "arms": {
                arm: {
                    **t[arm].summary(),
                    "since_weight_change": s[arm].summary(),
                    "shadow": self.shadow[arm].summary(),
                }
                for arm in self.arms
            },
            "ctr_test": {
                "candidate": candidate,
                "baseline": baseline,
                **ctr_difference(t[candidate].summary(), t[baseline].summary()),
            },
        }


@dataclass(frozen=True)
class CanaryDecision:
    action: Literal["advance", "hold", "rollback", "done"]
    weights: dict[str, float]  # the weights to apply (unchanged for hold and done)
    reason: str  # why, with the numbers


def canary_decision(
    summary: dict[str, Any], candidate: str, baseline: str, canary: CanaryConfig
) -> CanaryDecision:
    """The ramp's next move from ``GET /ab``, judged on the feedback since the last weight change with the
    always-valid, user-clustered test of serve/sequential.py (valid however often ``promote --auto``
    looks): hold until both arms have ``min_feedback`` events; then roll back when the candidate's CTR is
    lower, advance one step when it is at most ``margin`` lower (both at ``alpha / len(steps)`` per step),
    and hold otherwise."""
    weights = dict(summary["weights"])
    share = weights.get(candidate, 0.0)
    if share == 0:
        return CanaryDecision("done", weights, f"{candidate} has no traffic (rolled back or never started)")
    later = [s for s in canary.steps if s > share + 1e-9]
    if not later:  # the last step: the baseline gets no traffic left to compare with
        return CanaryDecision("done", weights, f"{candidate} already has {share:.0%} of traffic")
    step = {arm: summary["arms"][arm]["since_weight_change"] for arm in (candidate, baseline)}
    short = {
        arm: canary.min_feedback - step[arm]["feedback"]
        for arm in step
        if step[arm]["feedback"] < canary.min_feedback
    }
    if short:
        need = ", ".join(f"{arm} {n}" for arm, n in short.items())
        return CanaryDecision("hold", weights, f"waiting for feedback since the last change: {need} more")
    test = sequential_ctr_test(
        ArmSample.from_summary(step[candidate]),
        ArmSample.from_summary(step[baseline]),
        canary.margin,
        stage_alpha(canary.alpha, len(canary.steps)),
    )
    if test is None:
        return CanaryDecision("hold", weights, "no variance yet (under 2 users in an arm, or no clicks)")
    numbers = test.describe(canary.margin)
    if test.worse:
        return CanaryDecision("rollback", {candidate: 0.0, baseline: 1.0}, f"{candidate} worse: {numbers}")
    if test.noninferior:
        nxt = later[0]
        return CanaryDecision(
            "advance",
            {candidate: nxt, baseline: round(1 - nxt, 10)},
            f"{candidate} non-inferior, {share:.0%} -> {nxt:.0%}: {numbers}",
        )
    return CanaryDecision("hold", weights, f"not decided yet: {numbers}")


def starting_weights(arms: list[str], configured: dict[str, float] | None) -> dict[str, float]:
    """The configured weights in arm order, or an even split."""
    if configured is None:
        return {arm: 1 / len(arms) for arm in arms}
    unknown = set(configured) - set(arms)
    if unknown:
        raise ValueError(f"serve.weights names arms {sorted(unknown)} that are not served ({arms})")
    return RouterSettings(weights={arm: float(configured.get(arm, 0.0)) for arm in arms}).weights


class PredictBody(BaseModel):
    """POST /predict, as docs/design.md's HTTP contract says; strict types, bounded sizes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str = Field(min_length=1, max_length=256)
    candidates: list[str] = Field(min_length=1)
    history: list[str] | None = Field(None, max_length=1000)

    @field_validator("candidates", "history")
    @classmethod
    def _short_ids(cls, ids: list[str] | None) -> list[str] | None:
        if ids is not None:
            for item in ids:
                if not 0 < len(item) <= 256:
                    raise ValueError(f"item ids must be 1 to 256 characters, got one of {len(item)}")
        return ids


class FeedbackBody(BaseModel):
    """POST /feedback: one item of one /predict response, named by that response's ``request_id``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    clicked: bool
    request_id: str = Field(min_length=1, max_length=64_000)  # serve/tokens.py: about 11 k at 1,000 items


# -- response bodies: what the routes return, so /openapi.json documents the real shapes ------------------


class Answer(BaseModel):
    """The base of every response model: the service builds these, and a field it forgets fails loudly."""

    model_config = ConfigDict(extra="forbid")


class PredictResponse(Answer):
    """POST /predict's answer: one click probability per candidate, in candidate order."""

    arm: str = Field(description="the arm that answered (the assigned one, or the other while it is down)")
    model_version: str = Field(description="the registry version of that arm's model")
    scores: list[float] = Field(description="click probabilities in [0, 1], one per candidate, in order")
    request_id: str = Field(description="HMAC-signed id of this answer; /feedback must send it back")


class FeedbackAccepted(Answer):
    """POST /feedback's 202: the click was counted for the arm that served it."""

    accepted: Literal[True] = True
    arm: str


class FieldProblem(Answer):
    field: str = Field(description="dotted path of the field in the body ('' for the body itself)")
    problem: str


class Refusal(Answer):
    reason: str = Field(description="why feedback was refused; counted under GET /ab rejected_feedback")


class ErrorBody(Answer):
    """Every 4xx/5xx: a message, and for some the details (the fields that failed, a refusal's reason)."""

    error: str
    details: list[FieldProblem] | Refusal | None = None


class Health(Answer):
    ok: bool = Field(description="false until the router has its weights (then /predict answers 503)")
    arms: list[str]
    weights: dict[str, float] | None


class LatencyPercentiles(Answer):
    """Milliseconds over the latest requests answered (None before the first)."""

    p50: float | None
    p95: float | None
    p99: float | None


class ClusterCounts(Answer):
    """Per-user sums behind the user-clustered CTR variance (serve/sequential.py)."""

    users: int
    clicks_sq: int
    feedback_sq: int
    clicks_x_feedback: int


class ArmCounts(Answer):
    requests: int
    errors: int
    latency_ms: LatencyPercentiles
    feedback: int
    clicks: int
    ctr: float | None
    clusters: ClusterCounts


class ArmSummary(ArmCounts):
    """One arm since the ledger started, plus since the last weight change and its shadow-scored requests."""

    since_weight_change: ArmCounts
    shadow: ArmCounts


class CtrDifference(Answer):
    """CTR(candidate) - CTR(baseline) since the start, its user-clustered standard error (display only)."""

    candidate: str
    baseline: str
    difference: float | None
    se: float | None


class CanaryNext(Answer):
    action: Literal["advance", "hold", "rollback", "done"]
    weights: dict[str, float]
    reason: str


class CanaryState(Answer):
    steps: list[float] = Field(description="the candidate's traffic shares the ramp walks through")
    next: CanaryNext = Field(description="what `marn serve promote` would do now")


class ABSummary(Answer):
    """GET /ab: the ledger's numbers and this router replica's weights and canary judgement."""

    weights: dict[str, float] | None
    shadow: bool | None
    arms: dict[str, ArmSummary]
    ctr_test: CtrDifference
    rejected_feedback: dict[str, int] = Field(description="refused feedback by reason (never in the CTR)")
    events_folded: int = Field(description="events counted without latency sample (router buffer was full)")
    events_pruned: int = Field(
        0, description="event-log rows dropped as the oldest beyond serve.ledger_max_events (counted first)"
    )
    events_buffered: int = Field(description="events this router replica has not flushed to the ledger yet")
    refused_callers: dict[str, int] = Field(
        default_factory=dict,
        description="requests this router replica refused before reading them (401/403), by reason",
    )
    canary: CanaryState | None = Field(None, description="absent unless exactly two arms")
