"""The canary's always-valid CTR test: a one-sided mixture SPRT with a user-clustered variance.

``marn serve promote --auto`` looks at the numbers every interval and acts at the first look that crosses a
boundary, so a fixed-alpha test re-run at every look rejects far more often than alpha. This test stays
valid however often it is looked at (Johari, Koomen, Pekelis & Walsh, "Always valid inference", Operations
Research 2022; Howard, Ramdas, McAuliffe & Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence
sequences", Annals of Statistics 2021, the normal mixture).

Notation: θ = CTR(candidate) - CTR(baseline), θ̂ its estimate, V its variance, I = 1/V the information.

Variance, clustered by user: feedback events of one user are correlated (the same person, often the same
request), so the events are not independent draws. Each arm's CTR is a ratio estimator p̂ = ΣC / ΣN over
users u with C_u clicks in N_u feedback events; its delta-method (cluster-robust) variance is

    V_arm = n / (n - 1) · Σ_u (C_u - p̂ N_u)² / (ΣN)²,  Σ_u (C_u - p̂ N_u)² = ΣC² - 2 p̂ ΣCN + p̂² ΣN²,

so the ledger needs, per arm and since the last weight change, the users n and ΣC², ΣN², ΣCN besides the
clicks ΣC and feedback ΣN (:class:`ClusterSums`). It is floored at the binomial variance of the pooled CTR,
so an arm with no clicks yet (p̂ = 0, a clustered variance of 0) does not look infinitely precise.

Evidence: under H0 θ ≥ θ0 against θ < θ0, with Y = (θ0 - θ̂)·I, the mixture over a half-normal prior of
scale τ on the effect δ = θ0 - θ > 0 of the likelihood ratios exp(δY - δ²I/2) is

    Λ = 2 / sqrt(1 + τ²I) · exp(Y² / (2A)) · Φ(Y / sqrt(A)),  A = I + 1/τ²,

a (super)martingale under H0 for the Gaussian approximation of θ̂ (Ville: P(ever Λ ≥ 1/α) ≤ α). The
always-valid p-value is 1/Λ. Two such tests decide the canary: "worse" (θ0 = 0: the candidate's CTR is
lower) and "non-inferior" (the mirror image at θ0 = -margin: the candidate's CTR is at most ``margin``
lower). τ = ``margin``: the mixture puts its weight on effects of the size the canary cares about.

Several ramp steps: the ledger restarts its counts at each weight change, so each step is its own test.
Each gets alpha / len(steps) (Bonferroni): a ramp judges at most len(steps) steps (a start below the first
step, then every step but the last), so the whole ramp's false rollback stays below alpha.

Validity and power of this rule as the ramp runs it are simulated in tests/unit/test_canary_sequential.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr

MAX_CLUSTER_USERS = 200_000  # users tracked per arm and step; beyond it the least recent starts afresh


@dataclass
class ClusterSums:
    """Per-user aggregates of one arm's feedback for the clustered variance: users, ΣC², ΣN², ΣCN.

    Kept incrementally from each user's running (clicks, feedback). The durable ledger
    (serve/ledger_store.py) keeps one row per (scope, arm, user) and these sums beside them, moved by each
    row's change in the same transaction (equal to ``COUNT(*), SUM(clicks*clicks), ...`` over the rows,
    tested), so a read of them costs the same at any number of users.
    """

    users: int = 0
    clicks_sq: int = 0
    feedback_sq: int = 0
    clicks_x_feedback: int = 0
    max_users: int = MAX_CLUSTER_USERS
    # user -> (clicks, feedback); bounded: an evicted user who comes back counts as a new user (a
    # slightly smaller variance; only past max_users distinct users in one step)
    per_user: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict, repr=False)

    def add(self, user_id: str, clicked: bool) -> None:
        clicks, shown = self.per_user.pop(user_id, (0, 0))
        if shown == 0:
            self.users += 1
        new_clicks, new_shown = clicks + bool(clicked), shown + 1
        self.clicks_sq += new_clicks**2 - clicks**2
        self.feedback_sq += new_shown**2 - shown**2
        self.clicks_x_feedback += new_clicks * new_shown - clicks * shown
        self.per_user[user_id] = (new_clicks, new_shown)
        if len(self.per_user) > self.max_users:
            self.per_user.popitem(last=False)

    def summary(self) -> dict[str, int]:
        return {
            "users": self.users,
            "clicks_sq": self.clicks_sq,
            "feedback_sq": self.feedback_sq,
            "clicks_x_feedback": self.clicks_x_feedback,
        }


@dataclass(frozen=True)
class ArmSample:
    """One arm's feedback since the last weight change, as the clustered variance needs it."""

    clicks: float  # ΣC
    feedback: float  # ΣN
    users: float  # n
    clicks_sq: float  # ΣC²
    feedback_sq: float  # ΣN²
    clicks_x_feedback: float  # ΣCN

    @classmethod
    def from_summary(cls, arm: Mapping[str, Any]) -> ArmSample:
        """From a ledger arm summary: ``feedback``, ``clicks`` and ``clusters`` (ClusterSums.summary())."""
        clusters = arm.get("clusters")
        if not isinstance(clusters, Mapping):
            raise ValueError("the ledger summary has no per-user 'clusters' sums (ClusterSums.summary())")
        sample = cls(
            clicks=arm["clicks"],
            feedback=arm["feedback"],
            **{k: clusters[k] for k in ("users", "clicks_sq", "feedback_sq", "clicks_x_feedback")},
        )
        values = np.asarray(sample.columns(), dtype=np.float64)
        if not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"the ledger's counts must be finite and non-negative, got {sample}")
        if sample.clicks > sample.feedback or sample.users > sample.feedback:
            raise ValueError(f"inconsistent ledger counts (clicks or users above feedback): {sample}")
        return sample

    def columns(self) -> tuple[float, ...]:
        """(ΣC, ΣN, n, ΣC², ΣN², ΣCN): the order the array functions below take an arm in."""
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)


def clustered_ctr(
    clicks: np.ndarray | float,
    feedback: np.ndarray | float,
    users: np.ndarray | float,
    clicks_sq: np.ndarray | float,
    feedback_sq: np.ndarray | float,
    clicks_x_feedback: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """The ratio estimator ΣC/ΣN and its cluster-robust variance (NaN below 2 users); arrays broadcast."""
    clicks, feedback, users = (np.asarray(x, dtype=np.float64) for x in (clicks, feedback, users))
    with np.errstate(divide="ignore", invalid="ignore"):
        ctr = clicks / feedback
        squares = np.asarray(clicks_sq) - 2 * ctr * clicks_x_feedback + ctr**2 * feedback_sq
        variance = users / (users - 1) * np.maximum(squares, 0.0) / feedback**2
    return ctr, np.where(users >= 2, variance, np.nan)


def difference_and_variance(
    candidate: tuple[np.ndarray | float, ...], baseline: tuple[np.ndarray | float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """θ̂ = CTR(candidate) - CTR(baseline) and V; each arm's variance floored at the binomial variance of
    the pooled CTR. Arms are (clicks, feedback, users, clicks_sq, feedback_sq, clicks_x_feedback)."""
    ctr_c, var_c = clustered_ctr(*candidate)
    ctr_b, var_b = clustered_ctr(*baseline)
    with np.errstate(divide="ignore", invalid="ignore"):
        pooled = (np.asarray(candidate[0]) + baseline[0]) / (np.asarray(candidate[1]) + baseline[1])
        binomial = pooled * (1 - pooled)
        variance = np.maximum(var_c, binomial / candidate[1]) + np.maximum(var_b, binomial / baseline[1])
    return ctr_c - ctr_b, variance


def log_evidence_lower(
    estimate: np.ndarray | float, variance: np.ndarray | float, null: float, tau: float
) -> np.ndarray:
    """log Λ against H0 θ ≥ ``null`` (the alternative: θ below it); see the module docstring. 0 where V is
    not positive and finite (no information yet)."""
    estimate, variance = np.asarray(estimate, np.float64), np.asarray(variance, np.float64)
    ok = np.isfinite(variance) & (variance > 0) & np.isfinite(estimate)
    v = np.where(ok, variance, 1.0)
    information = 1 / v
    y = (null - np.where(ok, estimate, null)) * information
    a = information + 1 / tau**2
    log_lr = math.log(2) - 0.5 * np.log1p(tau**2 * information) + y**2 / (2 * a) + log_ndtr(y / np.sqrt(a))
    return np.where(ok, log_lr, 0.0)


def log_evidence_upper(
    estimate: np.ndarray | float, variance: np.ndarray | float, null: float, tau: float
) -> np.ndarray:
    """log Λ against H0 θ ≤ ``null`` (the alternative: θ above it): the mirror image."""
    return log_evidence_lower(-np.asarray(estimate, np.float64), variance, -null, tau)


def stage_alpha(alpha: float, n_steps: int) -> float:
    """Each ramp step's share of alpha (see the module docstring)."""
    return alpha / max(n_steps, 1)


HOLD, ADVANCE, ROLLBACK = 0, 1, -1


def judge(
    candidate: tuple[np.ndarray | float, ...],
    baseline: tuple[np.ndarray | float, ...],
    margin: float,
    alpha: float,
    min_feedback: int,
) -> np.ndarray:
    """The canary rule, vectorised over looks (the simulation runs thousands of ramps through it):
    ROLLBACK once both arms have ``min_feedback`` events and the candidate is worse (always-valid, level
    ``alpha``); else ADVANCE when it is non-inferior at ``margin``; else HOLD. Arms as for
    :func:`difference_and_variance`."""
    enough = (np.asarray(candidate[1]) >= min_feedback) & (np.asarray(baseline[1]) >= min_feedback)
    estimate, variance = difference_and_variance(candidate, baseline)
    threshold = math.log(1 / alpha)
    worse = enough & (log_evidence_lower(estimate, variance, 0.0, margin) >= threshold)
    noninferior = enough & (log_evidence_upper(estimate, variance, -margin, margin) >= threshold)
    return np.where(worse, ROLLBACK, np.where(noninferior, ADVANCE, HOLD))


@dataclass(frozen=True)
class SequentialCtrTest:
    """One look at one ramp step: the estimate, the always-valid p-values and confidence bounds."""

    difference: float  # CTR(candidate) - CTR(baseline)
    se: float  # its clustered standard error
    p_worse: float  # always-valid p of H0 "the candidate's CTR is not lower"
    p_noninferior: float  # always-valid p of H0 "the candidate's CTR is lower by margin or more"
    upper: float  # always-valid 1 - alpha upper bound of the difference (worse when below 0)
    lower: float  # ... lower bound (non-inferior when above -margin)
    alpha: float  # this step's alpha
    verdict: int  # judge()'s: ROLLBACK (worse), ADVANCE (non-inferior) or HOLD

    @property
    def worse(self) -> bool:
        return self.verdict == ROLLBACK

    @property
    def noninferior(self) -> bool:
        return self.verdict == ADVANCE

    def describe(self, margin: float) -> str:
        return (
            f"CTR difference {self.difference:+.4f} (clustered se {self.se:.4f}), always-valid "
            f"{1 - self.alpha:.4g} bounds [{self.lower:+.4f}, {self.upper:+.4f}]; p(worse) "
            f"{self.p_worse:.3g}, p(non-inferior at margin {margin}) {self.p_noninferior:.3g}, "
            f"alpha {self.alpha:.3g} per step"
        )


def sequential_ctr_test(
    candidate: ArmSample, baseline: ArmSample, margin: float, alpha: float
) -> SequentialCtrTest | None:
    """The always-valid test of one look; None while either arm has under 2 users or no variance."""
    arms = [candidate.columns(), baseline.columns()]
    estimate, variance = (float(x) for x in difference_and_variance(*arms))
    if not (math.isfinite(estimate) and math.isfinite(variance) and variance > 0):
        return None
    threshold = math.log(1 / alpha)

    def bound(evidence: Any, direction: float) -> float:
        """The null where the evidence equals 1/alpha: the confidence sequence's edge on that side."""
        step = math.sqrt(variance)
        far = estimate + direction * step
        while evidence(estimate, variance, far, margin) < threshold:
            step *= 2
            far = estimate + direction * step
        low, high = sorted((estimate, far))
        return brentq(lambda null: float(evidence(estimate, variance, null, margin)) - threshold, low, high)

    return SequentialCtrTest(
        difference=estimate,
        se=math.sqrt(variance),
        p_worse=min(1.0, math.exp(-float(log_evidence_lower(estimate, variance, 0.0, margin)))),
        p_noninferior=min(1.0, math.exp(-float(log_evidence_upper(estimate, variance, -margin, margin)))),
        upper=bound(log_evidence_lower, 1.0),
        lower=bound(log_evidence_upper, -1.0),
        alpha=alpha,
        verdict=int(judge(*arms, margin=margin, alpha=alpha, min_feedback=0)),
    )


def ctr_difference(candidate: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float | None]:
    """The CTR difference of two ledger arm summaries and its clustered standard error, for display only:
    no p-value, since a fixed-alpha p-value read again at every look misleads (decisions: the canary)."""
    estimate, variance = difference_and_variance(
        ArmSample.from_summary(candidate).columns(), ArmSample.from_summary(baseline).columns()
    )
    if not (np.isfinite(estimate) and np.isfinite(variance)):
        return {"difference": None, "se": None}
    return {"difference": float(estimate), "se": math.sqrt(float(variance))}
