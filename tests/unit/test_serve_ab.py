"""A/B logic without Ray: sticky assignment, the ramp, the CTR test, the canary decisions, request bodies."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from marn.config import CanaryConfig
from serve.ab import (
    ABLedger,
    FeedbackBody,
    PredictBody,
    RouterSettings,
    assign_arm,
    canary_decision,
    ctr_test,
    starting_weights,
)

USERS = [f"user-{k}" for k in range(20_000)]
SALT = bytes(range(32))


def test_assignment_is_sticky_and_follows_the_weights():
    weights = {"marn": 0.3, "dupn": 0.7}
    first = [assign_arm(u, weights, SALT) for u in USERS]
    assert first == [assign_arm(u, dict(weights), SALT) for u in USERS]  # same answer on every call
    share = first.count("marn") / len(USERS)
    assert abs(share - 0.3) < 0.02  # 20k users: the binomial sd is 0.0032


def test_a_ramp_only_moves_users_into_the_candidate():
    before = {u: assign_arm(u, {"marn": 0.05, "dupn": 0.95}, SALT) for u in USERS}
    after = {u: assign_arm(u, {"marn": 0.25, "dupn": 0.75}, SALT) for u in USERS}
    assert all(after[u] == "marn" for u in USERS if before[u] == "marn")
    assert sum(a == "marn" for a in after.values()) > 3 * sum(b == "marn" for b in before.values())


def test_zero_weight_arm_gets_nobody():
    assert {assign_arm(u, {"marn": 0.0, "dupn": 1.0}, SALT) for u in USERS[:2000]} == {"dupn"}


def test_ctr_test_matches_a_hand_computed_z():
    result = ctr_test(120, 1000, 100, 1000)
    pooled = 220 / 2000
    z = (0.12 - 0.10) / math.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert result["z"] == pytest.approx(z)
    assert result["p_two_sided"] == pytest.approx(math.erfc(z / math.sqrt(2)))
    assert result["p_a_lower"] == pytest.approx(1 - 0.5 * math.erfc(z / math.sqrt(2)))
    assert ctr_test(0, 0, 5, 10)["z"] is None


def _summary(weights, candidate_counts, baseline_counts):
    def arm(counts):  # one feedback event per user: the per-user sums of independent events
        shown, clicks = counts
        clusters = {"users": shown, "clicks_sq": clicks, "feedback_sq": shown, "clicks_x_feedback": clicks}
        return {"since_weight_change": {"feedback": shown, "clicks": clicks, "clusters": clusters}}

    return {"weights": weights, "arms": {"marn": arm(candidate_counts), "dupn": arm(baseline_counts)}}


CANARY = CanaryConfig(steps=(0.05, 0.25, 0.5, 1.0), min_feedback=200, alpha=0.05)


def test_canary_holds_until_both_arms_have_feedback():
    decision = canary_decision(
        _summary({"marn": 0.05, "dupn": 0.95}, (50, 5), (900, 90)), "marn", "dupn", CANARY
    )
    assert decision.action == "hold" and "marn 150" in decision.reason
    assert decision.weights == {"marn": 0.05, "dupn": 0.95}


def test_canary_advances_one_step_when_non_inferior_and_finishes_at_full_traffic():
    undecided = canary_decision(
        _summary({"marn": 0.05, "dupn": 0.95}, (300, 33), (3000, 300)), "marn", "dupn", CANARY
    )
    assert undecided.action == "hold"  # not worse, but not yet shown to be within the margin either
    decision = canary_decision(
        _summary({"marn": 0.05, "dupn": 0.95}, (20000, 2050), (60000, 6000)), "marn", "dupn", CANARY
    )
    assert decision.action == "advance"
    assert decision.weights == {"marn": 0.25, "dupn": 0.75}
    done = canary_decision(_summary({"marn": 1.0, "dupn": 0.0}, (300, 33), (0, 0)), "marn", "dupn", CANARY)
    assert done.action == "done"  # at 100% the baseline has no traffic: nothing left to wait for


def test_canary_rolls_back_a_significantly_worse_candidate():
    decision = canary_decision(
        _summary({"marn": 0.25, "dupn": 0.75}, (4000, 240), (12000, 1200)), "marn", "dupn", CANARY
    )
    assert decision.action == "rollback"
    assert decision.weights == {"marn": 0.0, "dupn": 1.0}


def test_ledger_credits_feedback_to_the_arm_that_served_and_resets_the_step_on_weight_changes():
    ledger = ABLedger(["marn", "dupn"])
    ledger.weights_changed({"marn": 0.5, "dupn": 0.5})
    ledger.record_requests([("u1", "marn", 12.0, True, False), ("u2", "dupn", 30.0, True, False)])
    ledger.record_requests([("u1", "dupn", 50.0, True, True)])  # a shadow score: not the user's arm
    assert ledger.record_feedback("u1", True, fallback_arm="dupn") == "marn"
    assert ledger.record_feedback("never-served", False, fallback_arm="dupn") == "dupn"
    summary = ledger.summary()
    assert summary["arms"]["marn"]["clicks"] == 1 and summary["arms"]["marn"]["ctr"] == 1.0
    assert summary["arms"]["dupn"]["feedback"] == 1 and summary["arms"]["dupn"]["requests"] == 1
    assert summary["arms"]["dupn"]["shadow"]["requests"] == 1
    assert summary["arms"]["marn"]["latency_ms"]["p50"] == 12.0
    ledger.weights_changed({"marn": 0.25, "dupn": 0.75})
    after = ledger.summary()["arms"]["marn"]
    assert after["since_weight_change"]["feedback"] == 0 and after["feedback"] == 1


def test_router_settings_reject_bad_weights():
    with pytest.raises(ValidationError, match="sum to 1"):
        RouterSettings(weights={"marn": 0.5, "dupn": 0.6})
    with pytest.raises(ValidationError, match=r"\[0, 1\]"):
        RouterSettings(weights={"marn": -0.5, "dupn": 1.5})
    with pytest.raises(ValidationError):
        RouterSettings.model_validate({"weights": {"marn": 1.0}, "shdow": True})  # typo: unknown key
    with pytest.raises(ValueError, match="not served"):
        starting_weights(["marn", "dupn"], {"din": 1.0})
    assert starting_weights(["marn", "dupn"], None) == {"marn": 0.5, "dupn": 0.5}


@pytest.mark.parametrize(
    "body",
    [
        {"candidates": ["i1"]},  # missing user_id
        {"user_id": 7, "candidates": ["i1"]},  # wrong type
        {"user_id": "u", "candidates": "i1"},  # a string, not a list
        {"user_id": "u", "candidates": []},  # empty
        {"user_id": "u", "candidates": [1, 2]},  # ids must be strings
        {"user_id": "u" * 300, "candidates": ["i1"]},  # huge id
        {"user_id": "u", "candidates": ["i" * 300]},
        {"user_id": "u", "candidates": ["i1"], "extra": 1},  # unknown field
        {"user_id": "u", "candidates": ["i1"], "history": ["h"] * 1001},
    ],
)
def test_predict_body_rejects_bad_input(body):
    with pytest.raises(ValidationError):
        PredictBody.model_validate(body)


def test_predict_and_feedback_bodies_accept_the_contract():
    body = PredictBody.model_validate({"user_id": "u", "candidates": ["a", "b"], "history": ["c"]})
    assert body.candidates == ["a", "b"] and body.history == ["c"]
    assert PredictBody.model_validate({"user_id": "u", "candidates": ["a"]}).history is None
    click = {"user_id": "u", "item_id": "a", "clicked": False, "request_id": "v1.a.b.c"}
    assert FeedbackBody.model_validate(click).clicked is False
    with pytest.raises(ValidationError):
        FeedbackBody.model_validate({**click, "clicked": "yes"})
    with pytest.raises(ValidationError):  # feedback names the response it is about
        FeedbackBody.model_validate({"user_id": "u", "item_id": "a", "clicked": False})
