"""The canary's always-valid, user-clustered CTR test (serve/sequential.py) and the ramp it drives.

The simulation runs thousands of ramps through the very rule ``canary_decision`` applies
(``serve.sequential.judge``), vectorised over ramps: users arrive in batches between looks, each with
several feedback events and a CTR of their own (so a user's events are correlated), the candidate's share
follows CanaryConfig's steps, the counts restart at each weight change, and the rule looks after every
batch, as ``marn serve promote --auto`` does every interval.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import betabinom, binom, norm

from marn.config import CanaryConfig
from serve.ab import ABLedger, canary_decision
from serve.sequential import (
    ADVANCE,
    HOLD,
    ROLLBACK,
    ArmSample,
    ClusterSums,
    clustered_ctr,
    judge,
    log_evidence_lower,
    log_evidence_upper,
    stage_alpha,
)

CANARY = CanaryConfig()  # the defaults the service runs with
MAX_EVENTS = 8  # feedback events per user in one batch: 1 + Binomial(7, 2/7), mean 3
USER_CONCENTRATION = 10.0  # a user's own CTR ~ Beta(mean CTR · 10, (1 - mean) · 10): correlated events


def user_cells(ctr: float) -> tuple[np.ndarray, np.ndarray]:
    """Every (events N, clicks C) a user can have, with its probability and its (C, N, 1, C², N², CN) row:
    a batch of n users is then one multinomial draw over these cells, exact and cheap."""
    rows, probabilities = [], []
    a, b = ctr * USER_CONCENTRATION, (1 - ctr) * USER_CONCENTRATION
    for n in range(1, MAX_EVENTS + 1):
        p_n = binom.pmf(n - 1, MAX_EVENTS - 1, 2 / (MAX_EVENTS - 1))
        for c in range(n + 1):
            rows.append((c, n, 1, c * c, n * n, c * n))
            probabilities.append(p_n * betabinom.pmf(c, n, a, b))
    p = np.asarray(probabilities)
    return p / p.sum(), np.asarray(rows, dtype=np.float64)


def simulate_ramps(
    seed: int,
    n_ramps: int,
    ctr_candidate: float,
    ctr_baseline: float,
    users_per_look: int,
    max_looks: int,
    canary: CanaryConfig = CANARY,
) -> np.ndarray:
    """Each ramp's outcome after at most ``max_looks`` looks: -1 rolled back, 1 promoted (reached the last
    step), 0 still running."""
    rng = np.random.default_rng(seed)
    p_c, rows_c = user_cells(ctr_candidate)
    p_b, rows_b = user_cells(ctr_baseline)
    shares = np.asarray(canary.steps)
    alpha = stage_alpha(canary.alpha, len(canary.steps))
    step = np.zeros(n_ramps, dtype=int)  # the ramp starts at the first step
    since_change = {"candidate": np.zeros((n_ramps, 6)), "baseline": np.zeros((n_ramps, 6))}
    outcome = np.zeros(n_ramps, dtype=int)
    for _ in range(max_looks):
        running = np.flatnonzero(outcome == 0)
        if running.size == 0:
            break
        to_candidate = rng.binomial(users_per_look, shares[step[running]])  # sticky hash ~ a coin per user
        since_change["candidate"][running] += rng.multinomial(to_candidate, p_c) @ rows_c
        since_change["baseline"][running] += rng.multinomial(users_per_look - to_candidate, p_b) @ rows_b
        verdict = judge(
            tuple(since_change["candidate"][running].T),
            tuple(since_change["baseline"][running].T),
            canary.margin,
            alpha,
            canary.min_feedback,
        )
        outcome[running[verdict == ROLLBACK]] = -1
        advanced = running[verdict == ADVANCE]
        step[advanced] += 1
        for counts in since_change.values():
            counts[advanced] = 0  # the ledger's counts since the weight change restart
        outcome[advanced[step[advanced] == len(shares) - 1]] = 1
    return outcome


# -- the simulation: validity under peeking, the bad candidate, power ---------------------------------------


def test_equal_arms_are_rarely_rolled_back_however_often_the_ramp_looks():
    alpha = CANARY.alpha
    # 150 users a look: many looks per unit of information, the hardest case for a peeked-at test
    peeky = simulate_ramps(1, 2000, 0.10, 0.10, users_per_look=150, max_looks=600)
    assert (peeky == -1).mean() <= alpha + 0.01


def test_equal_arms_complete_the_ramp_and_a_worse_candidate_does_not():
    # 500 users with feedback a look (17 a second at one look every 30 s); 480 looks = 4 hours
    equal = simulate_ramps(2, 2000, 0.10, 0.10, users_per_look=500, max_looks=480)
    worse = simulate_ramps(3, 2000, 0.08, 0.10, users_per_look=500, max_looks=480)
    assert (equal == -1).mean() <= CANARY.alpha + 0.01
    assert (equal == 1).mean() >= 0.8  # power: measured 0.96 (see the report in the commit)
    assert (worse == 1).mean() <= 0.05
    assert (worse == -1).mean() >= 0.95  # and it is rolled back, not left holding


# -- the parts ---------------------------------------------------------------------------------------------


def test_cluster_sums_match_the_per_user_counts_and_stay_bounded():
    rng = random.Random(0)
    sums, per_user = ClusterSums(), {}
    for _ in range(5000):
        user, clicked = f"u{rng.randrange(700)}", rng.random() < 0.2
        sums.add(user, clicked)
        clicks, shown = per_user.get(user, (0, 0))
        per_user[user] = (clicks + clicked, shown + 1)
    c = np.array([v[0] for v in per_user.values()])
    n = np.array([v[1] for v in per_user.values()])
    expected = {
        "users": len(per_user),
        "clicks_sq": int((c * c).sum()),
        "feedback_sq": int((n * n).sum()),
        "clicks_x_feedback": int((c * n).sum()),
    }
    assert sums.summary() == expected
    small = ClusterSums(max_users=10)
    for k in range(100):
        small.add(f"u{k}", True)
    assert len(small.per_user) == 10 and small.users == 100


def test_the_clustered_variance_matches_the_spread_of_the_ctr_and_the_binomial_one_does_not():
    rng = np.random.default_rng(4)
    p, rows = user_cells(0.10)
    totals = rng.multinomial(np.full(4000, 2000), p) @ rows  # 4000 replicates of 2000 users
    ctr, variance = clustered_ctr(*totals.T)
    empirical = ctr.var()
    assert np.mean(variance) == pytest.approx(empirical, rel=0.1)
    binomial = np.mean(ctr * (1 - ctr) / totals[:, 1])
    assert binomial < 0.9 * empirical  # a design effect of about 1.2: ignoring users' correlation understates


def test_the_mixture_evidence_is_the_integral_over_the_half_normal_prior():
    tau = 0.01
    for estimate, variance, null in ((-0.004, 2e-5, 0.0), (0.002, 5e-6, 0.0), (-0.03, 1e-4, -0.01)):
        information = 1 / variance
        y = (null - estimate) * information

        def integrand(delta: float, y: float = y, information: float = information) -> float:
            return math.exp(delta * y - delta**2 * information / 2) * 2 * norm.pdf(delta, scale=tau)

        direct = quad(integrand, 0, 20 * tau, limit=200)[0]
        assert float(log_evidence_lower(estimate, variance, null, tau)) == pytest.approx(
            math.log(direct), abs=1e-6
        )
        mirrored = log_evidence_upper(-estimate, variance, -null, tau)
        assert float(mirrored) == pytest.approx(math.log(direct), abs=1e-6)


def _ledger_summary(candidate_ctr: float, baseline_ctr: float, users: tuple[int, int], seed: int = 0) -> dict:
    """A real ledger fed users with 3 feedback events each at the candidate's share of 5%."""
    ledger = ABLedger(["marn", "dupn"])
    ledger.weights_changed({"marn": 0.05, "dupn": 0.95})
    rng = random.Random(seed)
    for arm, n, ctr in (("marn", users[0], candidate_ctr), ("dupn", users[1], baseline_ctr)):
        for k in range(n):
            user = f"{arm}-{k}"
            ledger.record_requests([(user, arm, 5.0, True, False)])
            for _ in range(3):
                ledger.record_feedback(user, rng.random() < ctr, fallback_arm="dupn")
    return ledger.summary()


def test_canary_holds_until_min_feedback_even_for_a_clearly_worse_candidate():
    summary = _ledger_summary(0.0, 0.5, (60, 2000))  # 180 events, no clicks, against a 50% CTR
    decision = canary_decision(summary, "marn", "dupn", CANARY)
    assert decision.action == "hold" and "marn 20 more" in decision.reason


def test_canary_rolls_back_advances_and_holds_with_the_numbers_in_the_reason():
    worse = canary_decision(_ledger_summary(0.02, 0.10, (2000, 20000)), "marn", "dupn", CANARY)
    assert worse.action == "rollback" and worse.weights == {"marn": 0.0, "dupn": 1.0}
    assert "CTR difference -0.0" in worse.reason and "p(worse)" in worse.reason

    equal = canary_decision(_ledger_summary(0.10, 0.10, (6000, 60000)), "marn", "dupn", CANARY)
    assert equal.action == "advance" and equal.weights == {"marn": 0.25, "dupn": 0.75}
    assert "non-inferior" in equal.reason and "bounds" in equal.reason

    early = canary_decision(_ledger_summary(0.10, 0.10, (100, 2000)), "marn", "dupn", CANARY)
    assert early.action == "hold" and early.reason.startswith("not decided yet: CTR difference")


def test_canary_decision_applies_the_simulated_rule():
    alpha = stage_alpha(CANARY.alpha, len(CANARY.steps))
    expected = {ROLLBACK: "rollback", ADVANCE: "advance", HOLD: "hold"}
    seen = set()
    for seed, (candidate_ctr, users) in enumerate(
        [(0.02, 2000), (0.1, 6000), (0.1, 100), (0.085, 800), (0.11, 3000), (0.095, 1500)]
    ):
        summary = _ledger_summary(candidate_ctr, 0.10, (users, 10 * users), seed)
        arms = [
            ArmSample.from_summary(summary["arms"][a]["since_weight_change"]).columns()
            for a in ("marn", "dupn")
        ]
        verdict = int(judge(*arms, CANARY.margin, alpha, CANARY.min_feedback))
        assert canary_decision(summary, "marn", "dupn", CANARY).action == expected[verdict]
        seen.add(verdict)
    assert seen == {ROLLBACK, ADVANCE, HOLD}


def test_canary_refuses_a_ledger_without_per_user_sums():
    summary = _ledger_summary(0.10, 0.10, (100, 2000))
    del summary["arms"]["marn"]["since_weight_change"]["clusters"]
    with pytest.raises(ValueError, match="per-user 'clusters' sums"):
        canary_decision(summary, "marn", "dupn", CANARY)


def test_canary_config_rejects_a_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        CanaryConfig(margin=0.0)
    with pytest.raises(ValueError, match="margin"):
        CanaryConfig(margin=1.5)
