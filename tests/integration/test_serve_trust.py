"""The A/B service under attack and under failure, for real (Ray Serve on 127.0.0.1, the SQLite ledger).

1. The forged-feedback attack of issue 17: feedback for user ids that hash into the candidate arm (the
   attacker given the secret assignment salt, the worst case), without a request id, with forged ones,
   replayed ones and other users' ones, without a key or with the wrong role's, changes no count and no
   canary decision.
2. One genuine response cannot carry more clicks than serve.max_clicks_per_response.
3. Killing the ledger replica mid-load loses no count: counts before + sent during = counts after.

The service is test_serve.py's (the same registered models and Feast store, its own instance here).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import pytest
import requests
from test_serve import (  # noqa: F401 (fixtures: this module gets its own service)
    AUTH,
    client_post,
    kill_replica,
    operator_get,
    service,
    world,
)

from serve.ab import assign_arm, canary_decision
from serve.app import ledger_path
from serve.control import read_state

pytestmark = pytest.mark.slow

ARMS = ("marn", "dupn")
COUNTS = ("requests", "errors", "feedback", "clicks")


def _ab(url: str) -> dict[str, Any]:
    response = operator_get(f"{url}/ab", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _counts(summary: dict[str, Any]) -> dict[str, int]:
    out = {}
    for arm in ARMS:
        for scope, numbers in (
            ("total", summary["arms"][arm]),
            ("step", summary["arms"][arm]["since_weight_change"]),
        ):
            for name in COUNTS:
                out[f"{arm}.{scope}.{name}"] = numbers[name]
            out[f"{arm}.{scope}.users"] = numbers["clusters"]["users"]
    return out


def _predict(url: str, user: str, items: list[str]) -> dict[str, Any]:
    response = client_post(f"{url}/predict", json={"user_id": user, "candidates": items}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _feedback(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> requests.Response:
    return client_post(f"{url}/feedback", json=body, headers=headers or {}, timeout=30)


def _salt(cfg: Any) -> bytes:
    """The experiment's assignment salt, read from the ledger file (an attacker never has it)."""
    with sqlite3.connect(f"file:{ledger_path(cfg)}?mode=ro", uri=True) as db:
        return bytes.fromhex(db.execute("SELECT value FROM meta WHERE key = 'assignment_salt'").fetchone()[0])


def test_forged_feedback_changes_no_count_and_no_canary_decision(request):
    built, url = request.getfixturevalue("world"), request.getfixturevalue("service")
    cfg, items = built["cfg"], built["items"][:10]
    # Honest traffic first: every genuine click counts once.
    genuine = []
    for user in built["users"][:20]:
        answer = _predict(url, user, items)
        for item in items[:3]:
            body = {
                "user_id": user,
                "item_id": item,
                "clicked": item == items[0],
                "request_id": answer["request_id"],
            }
            assert _feedback(url, body).status_code == 202
            genuine.append(body)
    token = _predict(url, built["users"][40], items)["request_id"]  # no feedback was sent for it yet
    before = _ab(url)
    weights = before["weights"]
    decision_before = canary_decision(before, "marn", "dupn", cfg.serve.canary)
    salt = _salt(cfg)
    attackers = [u for u in (f"attacker-{k}" for k in range(400)) if assign_arm(u, weights, salt) == "marn"]
    attackers = attackers[:10]
    assert len(attackers) == 10
    _, fields, digests, mac = token.split(".")
    attempts: dict[str, list[dict[str, Any]]] = {
        "invalid_body": [],
        "forged": [],
        "replayed": [],
        "wrong_user": [],
    }
    for k, user in enumerate(attackers):
        for clicked in (False, True):
            item = items[k % len(items)]
            attempts["invalid_body"].append({"user_id": user, "item_id": item, "clicked": clicked})
            flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
            for forged in (f"v1.{fields}.{digests}.{flipped}", f"v1.{fields}.{digests}{digests[:11]}.{mac}"):
                attempts["forged"].append(
                    {"user_id": user, "item_id": item, "clicked": clicked, "request_id": forged}
                )
            replay = {**genuine[(2 * k + clicked) % len(genuine)], "clicked": clicked}  # a captured click
            attempts["replayed"].append(replay)
            attempts["wrong_user"].append(
                {"user_id": user, "item_id": item, "clicked": clicked, "request_id": token}
            )
    expected_status = {"invalid_body": 422, "forged": 403, "replayed": 409, "wrong_user": 403}
    for reason, bodies in attempts.items():
        for body in bodies:
            response = _feedback(url, body)
            assert response.status_code == expected_status[reason], (reason, response.text)
            assert isinstance(response.json()["error"], str)
    # Without a key, with a made-up one or with the operator's, a genuine click is refused before it is read.
    genuine_click = {**genuine[0], "request_id": token, "user_id": built["users"][40], "item_id": items[0]}
    outsiders = {
        "missing": ({"Authorization": ""}, 401),
        "unknown": ({"Authorization": "Bearer marn_" + "x" * 43}, 401),
        "wrong_role": (AUTH["operator"], 403),
    }
    for reason, (headers, status) in outsiders.items():
        for _ in range(3):
            assert _feedback(url, genuine_click, headers).status_code == status, reason
    after = _ab(url)
    assert _counts(after) == _counts(before)
    for reason, bodies in attempts.items():
        assert after["rejected_feedback"].get(reason, 0) - before["rejected_feedback"].get(reason, 0) == len(
            bodies
        )
    refused = {r: after["refused_callers"].get(r, 0) - before["refused_callers"].get(r, 0) for r in outsiders}
    assert all(n >= 3 for n in refused.values()), refused  # this replica's (1 router replica here)
    assert canary_decision(after, "marn", "dupn", cfg.serve.canary) == decision_before
    assert after["canary"]["next"] == before["canary"]["next"]


def test_one_response_counts_at_most_max_clicks_per_response(request):
    built, url = request.getfixturevalue("world"), request.getfixturevalue("service")
    limit = built["cfg"].serve.max_clicks_per_response
    items = built["items"][: limit + 3]
    user = built["users"][41]
    answer = _predict(url, user, items)
    before = _ab(url)
    statuses = [
        _feedback(url, {"user_id": user, "item_id": i, "clicked": True, "request_id": answer["request_id"]})
        for i in items
    ]
    assert [r.status_code for r in statuses] == [202] * limit + [429] * 3
    assert {r.json()["details"]["reason"] for r in statuses[limit:]} == {"click_limit"}
    after = _ab(url)
    arm = answer["arm"]
    assert after["arms"][arm]["clicks"] - before["arms"][arm]["clicks"] == limit
    assert (
        after["rejected_feedback"].get("click_limit", 0) - before["rejected_feedback"].get("click_limit", 0)
        == 3
    )


def test_killing_the_ledger_mid_load_loses_no_count(request):
    built, url = request.getfixturevalue("world"), request.getfixturevalue("service")
    cfg, users, items = built["cfg"], built["users"], built["items"][:8]
    before = _counts(_ab(url))
    sent = {"requests": 0, "feedback": 0, "clicks": 0, "lost": 0}
    lock, deadline = threading.Lock(), time.monotonic() + 25

    def client(k: int) -> None:
        session = requests.Session()
        session.headers.update(AUTH["client"])
        for n in range(150):  # bounded in count and time
            if time.monotonic() > deadline:
                return
            user = users[(k * 31 + n) % len(users)]
            try:
                response = session.post(
                    f"{url}/predict", json={"user_id": user, "candidates": items}, timeout=30
                )
            except requests.RequestException:
                with lock:
                    sent["lost"] += 1
                continue
            with lock:
                sent["requests"] += 1  # 200 or 503: the router counts both
            if response.status_code != 200:
                continue
            clicked = n % 3 == 0
            body = {"user_id": user, "item_id": items[n % len(items)], "clicked": clicked}
            body["request_id"] = response.json()["request_id"]
            retried = False
            for _ in range(60):  # the ledger restarting: 503, retry the same body
                status = session.post(f"{url}/feedback", json=body, timeout=30).status_code
                if status == 202 or (status == 409 and retried):  # 409 after a 503: the first try counted
                    with lock:
                        sent["feedback"] += 1
                        sent["clicks"] += clicked
                    break
                assert status == 503, status
                retried = True
                time.sleep(0.5)
            else:
                raise AssertionError("feedback never accepted after the ledger restart")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(4)
    kill_replica(read_state(cfg).gcs_port, "ab_ledger")
    for t in threads:
        t.join(180)
    assert sent["lost"] == 0 and sent["requests"] > 30 and sent["feedback"] > 10
    recovered = time.monotonic() + 120
    while time.monotonic() < recovered:
        response = operator_get(f"{url}/ab", timeout=30)
        if response.status_code == 200 and response.json()["events_buffered"] == 0:
            break
        time.sleep(1)
    after = _counts(_ab(url))

    def total(counts: dict[str, int], name: str) -> int:
        return sum(counts[f"{arm}.total.{name}"] for arm in ARMS)

    for name in ("requests", "feedback", "clicks"):
        assert total(after, name) == total(before, name) + sent[name], name
