"""Caller authentication (serve/callers.py), the salted assignment and the per-response feedback limits:
the three defences against A/B poisoning of docs/reviews/serving-2026-12-03.md, finding 1."""

from __future__ import annotations

import json
import os
import stat

import pytest
from test_serve_fuzz import InProcessService
from typer.testing import CliRunner

import cli.main
from marn.config import Config, ServeConfig
from serve.ab import assign_arm
from serve.callers import (
    CallerKeys,
    caller_entry,
    callers_entries,
    new_caller_keys,
    new_key,
    parse_callers,
    required_role,
    resolve_callers,
)
from serve.control import caller_key, keys_path, local_caller_keys
from serve.ledger_store import FeedbackClaim, SQLiteLedgerStore

ARMS = ["marn", "dupn"]


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- the callers list ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no callers"),
        ("frontend:client", "not name:role"),
        ("front end:client:" + "a" * 64, "caller name"),
        ("frontend:admin:" + "a" * 64, "role 'admin'"),
        ("frontend:client:" + "A" * 64, "64 lowercase hex"),
        ("frontend:client:" + "a" * 63, "64 lowercase hex"),
        ("a:client:" + "a" * 64 + ",b:operator:" + "a" * 64, "listed twice"),
        ("a:client:" + "a" * 64 + ",a:operator:" + "b" * 64, "listed twice"),
    ],
)
def test_a_malformed_callers_list_is_refused_with_the_reason(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_callers(text)


def test_a_key_is_identified_only_as_a_bearer_token_of_a_listed_digest():
    keys = new_caller_keys()
    callers = parse_callers(callers_entries(keys, "t"))
    assert callers.identify(f"Bearer {keys['client']}").role == "client"
    assert callers.identify(f"bearer  {keys['operator']} ").role == "operator"  # scheme case, spaces
    for refused in (
        None,
        "",
        keys["client"],  # no scheme
        f"Basic {keys['client']}",
        f"Bearer {new_key()}",  # a well-formed key nobody listed
        f"Bearer {keys['client'][:-1]}",
        "Bearer short",
        "Bearer " + "x" * 600,  # past MAX_HEADER_CHARS: not hashed
    ):
        assert callers.identify(refused) is None, refused


def test_resolve_callers_says_how_to_make_a_key(monkeypatch):
    monkeypatch.delenv("MARN_TEST_CALLERS", raising=False)
    with pytest.raises(RuntimeError, match="marn serve key"):
        resolve_callers("MARN_TEST_CALLERS")
    monkeypatch.setenv("MARN_TEST_CALLERS", "x:client:nothex")
    with pytest.raises(RuntimeError, match="64 lowercase hex"):
        resolve_callers("MARN_TEST_CALLERS")
    key = new_key()
    monkeypatch.setenv("MARN_TEST_CALLERS", caller_entry("frontend", "client", key))
    assert isinstance(resolve_callers("MARN_TEST_CALLERS"), CallerKeys)
    assert resolve_callers("MARN_TEST_CALLERS").identify(f"Bearer {key}").name == "frontend"


def test_roles_by_path_deny_by_default():
    assert required_role("/predict") == required_role("/feedback") == "client"
    assert required_role("/ab") == required_role("/ab/history") == "operator"
    for open_path in ("/healthz", "/dashboard", "/dashboard/assets/dashboard.js", "/docs", "/openapi.json"):
        assert required_role(open_path) is None
    for other in ("/predict/", "//predict", "/PREDICT", "/nope", "/dashboard/../ab", "/docsx"):
        assert required_role(other) == "operator", other


def test_marn_serve_key_prints_a_key_and_the_entry_that_lets_it_in():
    result = CliRunner().invoke(cli.main.app, ["serve", "key", "--name", "shop-frontend"])
    assert result.exit_code == 0, result.output
    key = result.output.split("key (give to shop-frontend only): ")[1].split()[0]
    entry = result.output.split("entry (for $MARN_SERVE_CALLERS): ")[1].split()[0]
    caller = parse_callers(entry).identify(f"Bearer {key}")
    assert (caller.name, caller.role) == ("shop-frontend", "client")
    bad = CliRunner().invoke(cli.main.app, ["serve", "key", "--name", "x", "--role", "admin"])
    assert bad.exit_code == 2


# -- the gate in front of the router ------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path):
    running = InProcessService(tmp_path)
    yield running
    running.close()


def test_every_route_needs_its_role_and_refusals_are_counted_apart_from_the_ledger(service):
    body = json.dumps({"user_id": "u1", "candidates": ["a", "b"]}).encode()
    client, operator = _bearer(service.keys["client"]), _bearer(service.keys["operator"])
    anonymous = service.post("/predict", body, {"authorization": ""})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
    assert "client key" in anonymous.json()["error"]
    assert service.post("/predict", body, _bearer(new_key())).status_code == 401
    assert service.post("/predict", body, operator).status_code == 403
    token = service.post("/predict", body, client).json()["request_id"]
    click = json.dumps({"user_id": "u1", "item_id": "a", "clicked": True, "request_id": token}).encode()
    assert service.post("/feedback", click, {"authorization": ""}).status_code == 401
    assert service.post("/feedback", click, operator).status_code == 403
    assert service.get("/ab", {"authorization": ""}).status_code == 401
    assert service.get("/ab", client).status_code == 403
    assert service.get("/ab/history", client).status_code == 403
    assert service.get("/anything-else", client).status_code == 403  # deny by default
    assert service.get("/anything-else", operator).status_code == 404
    for open_path in ("/healthz", "/dashboard", "/docs", "/openapi.json"):
        assert service.get(open_path, {"authorization": ""}).status_code == 200, open_path
    summary = service.get("/ab", operator).json()
    assert summary["refused_callers"] == {"missing": 3, "unknown": 1, "wrong_role": 5}
    # Refused callers never reach the ledger: no feedback, no rejection, one request (the genuine predict).
    assert summary["rejected_feedback"] == {}
    assert sum(a["requests"] for a in summary["arms"].values()) == 1
    assert service.post("/feedback", click, client).status_code == 202  # the genuine click still counts


def test_the_openapi_document_names_the_bearer_scheme_on_every_guarded_route(service):
    document = service.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["callerKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A caller key: client for /predict and /feedback, operator for /ab",
    }
    for path, method in (("/predict", "post"), ("/feedback", "post"), ("/ab", "get"), ("/ab/history", "get")):
        operation = document["paths"][path][method]
        assert operation["security"] == [{"callerKey": []}] and "401" in operation["responses"], path
    assert "security" not in document["paths"]["/healthz"]["get"]


# -- the salted assignment -----------------------------------------------------------------------------------


def test_the_assignment_depends_on_the_experiment_salt():
    users = [f"user-{k}" for k in range(4000)]
    weights = {"marn": 0.5, "dupn": 0.5}
    first = [assign_arm(u, weights, b"\x01" * 32) for u in users]
    again = [assign_arm(u, weights, b"\x01" * 32) for u in users]
    other = [assign_arm(u, weights, b"\x02" * 32) for u in users]
    assert first == again
    agree = sum(a == b for a, b in zip(first, other, strict=True)) / len(users)
    assert 0.45 < agree < 0.55  # independent halves: a new experiment reshuffles users (sd 0.008)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        assign_arm("u", weights, b"short")


def test_the_ledger_keeps_one_salt_per_experiment(tmp_path):
    store = SQLiteLedgerStore(tmp_path / "a.sqlite", ARMS, replay_window_s=60)
    salt = store.assignment_salt()
    store.close()
    reopened = SQLiteLedgerStore(tmp_path / "a.sqlite", ARMS, replay_window_s=60)
    assert reopened.assignment_salt() == salt and len(bytes.fromhex(salt)) == 32  # survives a restart
    reopened.close()
    other = SQLiteLedgerStore(tmp_path / "b.sqlite", ARMS, replay_window_s=60)
    assert other.assignment_salt() != salt  # a new ledger, a new experiment
    other.close()


def test_the_router_assigns_with_its_ledgers_salt(service):
    salt = bytes.fromhex(service.store.assignment_salt())
    weights = {"marn": 0.5, "dupn": 0.5}
    for k in range(20):
        body = json.dumps({"user_id": f"u{k}", "candidates": ["a"]}).encode()
        assert service.post("/predict", body).json()["arm"] == assign_arm(f"u{k}", weights, salt)


# -- per-response feedback limits ----------------------------------------------------------------------------


def _claims(key: str, n: int, clicked: bool) -> list[FeedbackClaim]:
    return [
        FeedbackClaim(key, "u1", "marn", "v1", f"item-{k}", clicked, 1e12, f"{key}-{k}-{clicked}")
        for k in range(n)
    ]


def test_one_response_counts_at_most_its_feedback_and_click_limits(tmp_path):
    store = SQLiteLedgerStore(
        tmp_path / "l.sqlite", ARMS, 3600, max_feedback_per_response=6, max_clicks_per_response=2
    )
    clicks = store.claim_feedback(_claims("r1", 4, clicked=True))
    assert clicks == ["accepted", "accepted", "click_limit", "click_limit"]
    views = store.claim_feedback(_claims("r1", 8, clicked=False))  # item-0/1 were counted as clicks
    assert (
        views
        == ["replayed", "replayed", "accepted", "accepted", "accepted", "accepted"] + ["response_limit"] * 2
    )
    assert store.claim_feedback(_claims("r2", 2, clicked=True)) == ["accepted"] * 2  # another response
    summary = store.summary()
    assert (summary["arms"]["marn"]["feedback"], summary["arms"]["marn"]["clicks"]) == (8, 4)
    assert summary["rejected_feedback"] == {"click_limit": 2, "replayed": 2, "response_limit": 2}
    store.close()


def test_the_router_answers_429_past_a_limit_and_says_which(tmp_path):
    service = InProcessService(tmp_path, ServeConfig(max_feedback_per_response=3, max_clicks_per_response=1))
    try:
        items = ["a", "b", "c", "d"]
        token = service.post("/predict", json.dumps({"user_id": "u1", "candidates": items}).encode())
        request_id = token.json()["request_id"]

        def click(item: str, clicked: bool) -> tuple[int, str | None]:
            body = {"user_id": "u1", "item_id": item, "clicked": clicked, "request_id": request_id}
            response = service.post("/feedback", json.dumps(body).encode())
            return response.status_code, (response.json().get("details") or {}).get("reason")

        assert click("a", True) == (202, None)
        assert click("b", True) == (429, "click_limit")
        assert click("b", False) == (202, None)
        assert click("c", False) == (202, None)
        assert click("d", False) == (429, "response_limit")
        assert service.post_get("/ab")["rejected_feedback"] == {"click_limit": 1, "response_limit": 1}
    finally:
        service.close()


# -- the local keys ------------------------------------------------------------------------------------------


def test_serve_up_keys_are_made_once_private_and_an_exported_key_wins(tmp_path, monkeypatch):
    cfg = Config.model_validate({"paths": {"work_dir": str(tmp_path)}})
    monkeypatch.delenv("MARN_SERVE_CLIENT_KEY", raising=False)
    with pytest.raises(RuntimeError, match="MARN_SERVE_CLIENT_KEY"):
        caller_key(cfg, "client")  # no local service, no exported key
    keys = local_caller_keys(cfg)
    assert stat.S_IMODE(os.stat(keys_path(cfg)).st_mode) == 0o600
    assert local_caller_keys(cfg) == keys  # kept across restarts
    assert caller_key(cfg, "operator") == keys["operator"]
    monkeypatch.setenv("MARN_SERVE_CLIENT_KEY", "marn_exported")
    assert caller_key(cfg, "client") == "marn_exported"
    callers = parse_callers(callers_entries(keys))
    assert callers.identify(f"Bearer {keys['client']}").name == "local-client"


def test_a_recorded_pid_counts_only_while_it_is_the_same_process(tmp_path):
    """Review finding 15: after a reboot the pid in serve.json may belong to a stranger, whose process group
    `marn serve down` would have signalled."""
    import psutil

    from serve.control import read_state, state_path

    cfg = Config.model_validate({"paths": {"work_dir": str(tmp_path)}})
    me = psutil.Process(os.getpid()).create_time()
    fields = {
        "gcs_port": 1,
        "dashboard": "http://127.0.0.1:1",
        "url": "http://127.0.0.1:2",
        "config_path": None,
    }
    path = state_path(cfg)
    path.parent.mkdir(parents=True)
    for started_at, alive in ((me, True), (None, True), (me - 3600, False)):  # None: a state from before
        path.write_text(json.dumps({"pid": os.getpid(), "started_at": started_at, **fields}))
        state = read_state(cfg)
        assert (state is not None) == alive and path.exists() == alive, started_at
