"""The A/B time series behind the dashboard: a bounded ring of periodic snapshots of ``GET /ab``.

The ledger keeps counts, not their history, so each router replica samples the summary every
``HISTORY_EVERY_S`` seconds (from its flush loop while it serves, and when ``GET /ab/history`` finds the
latest snapshot stale) into a ring of ``HISTORY_SIZE`` snapshots: one hour at 5 s, about 1 KB a snapshot for
two arms, so under 1 MB per replica. The ring lives in memory: a router restart starts it empty, and with
several router replicas each has its own ring of the same ledger numbers sampled at other moments (a
dashboard poll may be answered by any of them). Weight changes this replica applied are kept beside it
(bounded the same way): with the canary's decision in every snapshot, they are the canary's history.
"""

from __future__ import annotations

import math
from collections import deque

from pydantic import Field

from serve.ab import ABSummary, Answer, ArmCounts, CanaryNext, LatencyPercentiles
from serve.sequential import clustered_ctr

HISTORY_EVERY_S = 5.0
HISTORY_SIZE = 720
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


class ArmPoint(Answer):
    """One arm at one moment, since the ledger started."""

    requests: int
    errors: int
    feedback: int
    clicks: int
    ctr: float | None
    ctr_low: float | None = Field(description="95% interval (user-clustered, pointwise: not the canary test)")
    ctr_high: float | None
    latency_ms: LatencyPercentiles


class Snapshot(Answer):
    ts: float = Field(description="unix seconds")
    weights: dict[str, float] | None
    arms: dict[str, ArmPoint]
    canary: CanaryNext | None


class WeightChange(Answer):
    ts: float
    weights: dict[str, float]


class ABHistory(Answer):
    """GET /ab/history: this router replica's ring, oldest first."""

    arms: list[str] = Field(description="in assignment order: the candidate first")
    every_s: float = Field(description="seconds between snapshots")
    capacity: int = Field(description="snapshots kept; the oldest is dropped past it")
    snapshots: list[Snapshot]
    weight_changes: list[WeightChange] = Field(description="as this replica applied them, oldest first")
    canary_steps: list[float] | None = Field(description="the ramp's candidate shares (None: no canary)")


def ctr_interval(arm: ArmCounts) -> tuple[float | None, float | None]:
    """A 95% normal interval around the arm's CTR: the user-clustered variance of serve/sequential.py,
    floored at the binomial one (an arm with no clicks yet is not infinitely precise), clipped to [0, 1]."""
    if arm.ctr is None or arm.feedback == 0:
        return None, None
    c = arm.clusters
    _, clustered = clustered_ctr(
        arm.clicks, arm.feedback, c.users, c.clicks_sq, c.feedback_sq, c.clicks_x_feedback
    )
    binomial = arm.ctr * (1 - arm.ctr) / arm.feedback
    variance = max(float(clustered), binomial) if math.isfinite(clustered) else binomial
    half = Z_95 * math.sqrt(variance)
    return max(0.0, arm.ctr - half), min(1.0, arm.ctr + half)


def arm_point(arm: ArmCounts) -> ArmPoint:
    low, high = ctr_interval(arm)
    return ArmPoint(
        requests=arm.requests,
        errors=arm.errors,
        feedback=arm.feedback,
        clicks=arm.clicks,
        ctr=arm.ctr,
        ctr_low=low,
        ctr_high=high,
        latency_ms=arm.latency_ms,
    )


class HistoryRing:
    """Snapshots every ``every_s`` seconds, at most ``size`` of them (see the module docstring)."""

    def __init__(self, arms: list[str], every_s: float = HISTORY_EVERY_S, size: int = HISTORY_SIZE):
        if every_s <= 0 or size < 1:
            raise ValueError(f"a history needs every_s > 0 and size >= 1, got {every_s} and {size}")
        self.arms, self.every_s, self.size = list(arms), every_s, size
        self.snapshots: deque[Snapshot] = deque(maxlen=size)
        self.weight_changes: deque[WeightChange] = deque(maxlen=size)
        self.canary_steps: list[float] | None = None

    def due(self, now: float) -> bool:
        return not self.snapshots or now - self.snapshots[-1].ts >= self.every_s

    def add(self, summary: ABSummary, now: float) -> Snapshot:
        snapshot = Snapshot(
            ts=now,
            weights=summary.weights,
            arms={arm: arm_point(counts) for arm, counts in summary.arms.items()},
            canary=summary.canary.next if summary.canary else None,
        )
        self.snapshots.append(snapshot)
        self.canary_steps = list(summary.canary.steps) if summary.canary else None
        return snapshot

    def weights_changed(self, weights: dict[str, float], now: float) -> None:
        if not self.weight_changes or self.weight_changes[-1].weights != weights:
            self.weight_changes.append(WeightChange(ts=now, weights=dict(weights)))

    def view(self) -> ABHistory:
        return ABHistory(
            arms=self.arms,
            every_s=self.every_s,
            capacity=self.size,
            snapshots=list(self.snapshots),
            weight_changes=list(self.weight_changes),
            canary_steps=self.canary_steps,
        )
