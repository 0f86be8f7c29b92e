"""The HTTP edge of the A/B router, in-process: hostile bodies get a 4xx with ``{"error": ...}``, never a 5xx.

The router's own code (``RouterCore`` behind ``asgi_app``: body streaming, JSON parsing, validation,
request ids, feedback checks) runs over a real SQLite ledger; only the arms are replaced, by a scorer that
gives every candidate a fixed score from its id (no model or Feast needed to test the HTTP edge).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marn.config import ServeConfig
from serve.app import MAX_BODY_BYTES, LocalLedger, RouterCore, asgi_app
from serve.callers import CallerKeys, callers_entries, new_caller_keys, parse_callers, required_role
from serve.ledger_store import SQLiteLedgerStore
from serve.scoring import ScoreRequest

ARMS = ["marn", "dupn"]
EXAMPLES = 1000  # per endpoint, as the issue asks


async def id_scorer(arm: str, work: ScoreRequest) -> dict[str, Any]:
    """Scores from the item ids alone: deterministic, in [0, 1), one per candidate."""
    return {"arm": arm, "model_version": "v1", "scores": [(hash(i) % 1000) / 1000 for i in work.candidates]}


def make_callers() -> tuple[CallerKeys, dict[str, str]]:
    """A client and an operator key, and the callers that let them in."""
    keys = new_caller_keys()
    return parse_callers(callers_entries(keys, "test")), dict(keys)


def auth(keys: dict[str, str], path: str) -> dict[str, str]:
    """The Authorization header a path's role needs (none for the open paths)."""
    role = required_role(path)
    return {} if role is None else {"authorization": f"Bearer {keys[role]}"}


class InProcessService:
    """The router's ASGI app on one event loop, with a client that posts raw bytes to it, sending the key
    each path's role needs unless the headers given name their own ``authorization``."""

    def __init__(self, tmp: Path, serve_cfg: ServeConfig | None = None):
        cfg = serve_cfg or ServeConfig()
        self.store = SQLiteLedgerStore(
            tmp / "ledger.sqlite",
            ARMS,
            replay_window_s=3660,
            max_feedback_per_response=cfg.max_feedback_per_response,
            max_clicks_per_response=cfg.max_clicks_per_response,
        )
        callers, self.keys = make_callers()
        self.core = RouterCore(ARMS, id_scorer, LocalLedger(self.store), cfg, b"k" * 32, callers)
        self.core.reconfigure({"weights": {"marn": 0.5, "dupn": 0.5}})
        self.app = asgi_app(self.core)
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://router")

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        headers = {"content-type": "application/json", **auth(self.keys, path), **(headers or {})}
        return self.loop.run_until_complete(self.client.post(path, content=body, headers=headers))

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        headers = {**auth(self.keys, path), **(headers or {})}
        return self.loop.run_until_complete(self.client.get(path, headers=headers))

    def post_get(self, path: str) -> dict[str, Any]:
        response = self.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()
        self.store.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[InProcessService]:
    running = InProcessService(tmp_path_factory.mktemp("fuzz"))
    yield running
    running.close()


def _assert_no_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body, dict) and isinstance(body["error"], str)


# -- strategies ---------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**40, max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
ids = st.one_of(st.text(min_size=0, max_size=300), st.sampled_from(["i001", "u1", "", "\x00", "é" * 257]))


def _dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def _nasty_text() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.integers(1, 300_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 300_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.integers(1, 6000).map(lambda n: b'{"user_id": "u", "candidates": [' + b"9" * n + b"]}"),
        st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b'{"x": NaN}', b'{"clicked": 1e400}']),
        st.sampled_from(['{"user_id": "u", "candidates": ["é"]}']).flatmap(
            lambda t: st.sampled_from([t.encode(enc) for enc in ("utf-16", "utf-32", "latin-1", "utf-8-sig")])
        ),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=500),
    )


valid_ids = st.text(min_size=1, max_size=30)
predict_bodies = st.one_of(
    # Mostly well-formed: the scoring path and the request id run too, not only the refusals.
    st.fixed_dictionaries(
        {"user_id": valid_ids, "candidates": st.lists(valid_ids, min_size=1, max_size=30)},
        optional={"history": st.none() | st.lists(valid_ids, max_size=30)},
    ).map(_dump),
    st.fixed_dictionaries(
        {},
        optional={
            "user_id": st.one_of(ids, json_values),
            "candidates": st.one_of(st.lists(ids, max_size=20), json_values),
            "history": st.one_of(st.none(), st.lists(ids, max_size=20), json_values),
            "extra": json_values,
        },
    ).map(_dump),
    json_values.map(_dump),
    _nasty_text(),
)


def _feedback_bodies(genuine: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    def tampered(token: str) -> st.SearchStrategy[str]:
        return st.integers(0, len(token) - 1).flatmap(
            lambda k: st.sampled_from("AZaz09-_.=").map(lambda c: token[:k] + c + token[k + 1 :])
        )

    served = st.sampled_from(genuine)

    @st.composite
    def almost_genuine(draw: st.DrawFn) -> bytes:
        """A served response's (user, item, request id, clicked), each part sometimes swapped for another."""
        g, other = draw(served), draw(served)
        user = draw(st.sampled_from([g["user_id"], g["user_id"], other["user_id"], draw(valid_ids)]))
        item = draw(st.sampled_from([*g["candidates"], other["candidates"][0], draw(valid_ids)]))
        token = draw(st.sampled_from([g["request_id"], g["request_id"], other["request_id"]]))
        token = draw(st.sampled_from([token, token, draw(tampered(token))]))
        return _dump({"user_id": user, "item_id": item, "clicked": draw(st.booleans()), "request_id": token})

    return st.one_of(
        almost_genuine(),
        st.fixed_dictionaries(
            {},
            optional={
                "user_id": st.one_of(ids, served.map(lambda g: g["user_id"]), json_values),
                "item_id": st.one_of(ids, served.map(lambda g: g["candidates"][0]), json_values),
                "clicked": st.one_of(st.booleans(), json_values),
                "request_id": st.one_of(
                    st.text(max_size=100), json_values, served.map(lambda g: g["request_id"])
                ),
            },
        ).map(_dump),
        json_values.map(_dump),
        _nasty_text(),
    )


HEADERS = st.sampled_from(
    [
        {},
        {"content-type": "application/json; charset=utf-8"},
        {"content-type": "application/json; charset=latin-1"},
    ]
)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same bodies every run: CI never flakes on a new example
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@FUZZ
@given(body=predict_bodies, headers=HEADERS)
def test_fuzzed_predict_bodies_never_get_a_5xx(service, body, headers):
    response = service.post("/predict", body, headers)
    _assert_no_server_error(response)
    if response.status_code == 200:
        answer = response.json()
        assert answer["arm"] in ARMS and all(0 <= s < 1 for s in answer["scores"])


def _genuine_responses(service: InProcessService) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k in range(20):
        body = {"user_id": f"user-{k}", "candidates": [f"i{k}-{j}" for j in range(5)]}
        answer = service.post("/predict", json.dumps(body).encode()).json()
        out.append({**body, "request_id": answer["request_id"]})
    return out


def test_fuzzed_feedback_bodies_never_get_a_5xx_and_only_genuine_clicks_count(service):
    genuine = _genuine_responses(service)
    before = service.store.summary()
    statuses: dict[int, int] = {}

    @FUZZ
    @given(body=_feedback_bodies(genuine), headers=HEADERS)
    def fuzz(body: bytes, headers: dict[str, str]) -> None:
        response = service.post("/feedback", body, headers)
        _assert_no_server_error(response)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    fuzz()
    assert sum(statuses.values()) >= EXAMPLES
    after = service.store.summary()
    accepted = statuses.get(202, 0)
    counted = sum(after["arms"][a]["feedback"] - before["arms"][a]["feedback"] for a in ARMS)
    # Only a genuine (user, item, request id) counts, and once: at most once per served item.
    assert counted == accepted <= sum(len(g["candidates"]) for g in genuine)
    assert accepted > 0 and {403, 409, 422}.issubset(statuses)
    assert sum(after["rejected_feedback"].values()) > sum(before["rejected_feedback"].values())


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 200_000 + b"]" * 200_000, 400),
        (b'{"user_id": "u", "candidates": ["i"], "n": ' + b"7" * 5000 + b"}", 400),
        (b'{"user_id": "u", "candidates": [NaN]}', 400),
        (b'{"user_id": "u", "candidates": [Infinity]}', 400),
        (b'{"user_id": "u", "candidates": [-Infinity]}', 400),
        ('{"user_id": "é", "candidates": ["i"]}'.encode("latin-1"), 400),
        ('{"user_id": "u", "candidates": ["i"]}'.encode("utf-16"), 400),
        ('{"user_id": "u", "candidates": ["i"]}'.encode("utf-8-sig"), 400),
        (b'{"user_id": "\\ud800", "candidates": ["i"]}', 422),  # a lone surrogate
        (b'{"user_id": "u", "candidates": ["i"], "\\udfff": 1}', 422),
        (b'{"user_id": "u", "candidates": ["i"]}', 200),
    ],
)
def test_named_hostile_bodies(service, body, status):
    response = service.post("/predict", body)
    assert response.status_code == status, response.text[:300]
    if status >= 400:
        assert isinstance(response.json()["error"], str)


def test_a_wrong_charset_is_refused(service):
    body = json.dumps({"user_id": "u", "candidates": ["i"]}).encode()
    response = service.post("/predict", body, {"content-type": "application/json; charset=utf-16"})
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]


@pytest.mark.parametrize("declared", [None, "10"])  # chunked (no Content-Length), and a lying one
def test_an_oversized_streamed_body_is_refused_before_it_is_read_whole(service, declared):
    chunk, sent = b" " * 65_536, [0]

    async def receive() -> dict[str, Any]:
        sent[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": sent[0] < 64}  # 4 MiB offered

    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    headers = [(b"content-type", b"application/json")]
    headers += [(b"authorization", f"Bearer {service.keys['client']}".encode())]
    headers += [] if declared is None else [(b"content-length", declared.encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    service.loop.run_until_complete(service.app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert start["status"] == 413
    assert sent[0] <= math.ceil(MAX_BODY_BYTES / len(chunk)) + 1  # stopped reading at the cap
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    assert "error" in json.loads(body)


def test_each_refusal_has_its_status_and_its_counter_and_only_the_genuine_click_counts(tmp_path):
    service = InProcessService(tmp_path, ServeConfig(feedback_window_s=2.0))
    try:
        body = {"user_id": "u1", "candidates": ["a", "b"]}
        token = service.post("/predict", json.dumps(body).encode()).json()["request_id"]
        click = {"user_id": "u1", "item_id": "a", "clicked": True, "request_id": token}
        cases = [
            ({**click, "request_id": "nonsense"}, 400, "malformed"),
            (
                {**click, "request_id": token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")},
                403,
                "forged",
            ),
            ({**click, "user_id": "u2"}, 403, "wrong_user"),
            ({**click, "item_id": "z"}, 422, "not_served"),
            ({"user_id": "u1", "item_id": "a", "clicked": True}, 422, "invalid_body"),
            (click, 202, None),
            (click, 409, "replayed"),
        ]
        for feedback, status, _ in cases:
            assert service.post("/feedback", json.dumps(feedback).encode()).status_code == status, feedback
        time.sleep(2.1)  # past the window
        late = {**click, "item_id": "b"}
        assert service.post("/feedback", json.dumps(late).encode()).status_code == 410
        summary = service.post_get("/ab")
        rejected = {reason: 1 for _, _, reason in cases if reason} | {"expired": 1}
        assert summary["rejected_feedback"] == rejected
        arm = summary["arms"]["marn"]["feedback"] + summary["arms"]["dupn"]["feedback"]
        assert arm == 1
    finally:
        service.close()
