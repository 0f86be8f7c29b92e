"""The router's typed HTTP surface, in-process: the OpenAPI schema documents the bodies the service really
sends and takes, /docs is served without a CDN, the media-type refusals, the dashboard page's security
headers and assets, and the history ring behind it."""

from __future__ import annotations

import json
import re
import time
from html.parser import HTMLParser
from typing import Any

import jsonschema
import pytest
from test_serve_fuzz import ARMS, InProcessService, auth

from serve.ab import ArmCounts, ClusterCounts, LatencyPercentiles
from serve.dashboard.history import Z_95, HistoryRing, ctr_interval
from serve.dashboard.page import ASSETS, CONTENT_SECURITY_POLICY, STATIC


@pytest.fixture
def service(tmp_path):
    running = InProcessService(tmp_path)
    yield running
    running.close()


def _get(service: InProcessService, path: str):
    return service.get(path)


def _conforms(document: dict[str, Any], model: str, instance: Any) -> None:
    """``instance`` against ``#/components/schemas/<model>`` of the served OpenAPI document (3.1: JSON
    Schema 2020-12), resolving its $refs within the document."""
    schema = {"$ref": f"#/components/schemas/{model}", "components": document["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def _body_schema(document: dict[str, Any], path: str) -> str:
    content = document["paths"][path]["post"]["requestBody"]["content"]
    return content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]


def _response_schema(document: dict[str, Any], path: str, method: str, status: str) -> str:
    content = document["paths"][path][method]["responses"][status]["content"]
    return content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]


def test_openapi_documents_the_real_request_and_response_bodies(service):
    response = _get(service, "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    schemas = document["components"]["schemas"]

    assert _body_schema(document, "/predict") == "PredictBody"
    predict = schemas["PredictBody"]
    assert set(predict["required"]) == {"user_id", "candidates"} and predict["additionalProperties"] is False
    assert predict["properties"]["candidates"]["minItems"] == 1
    assert predict["properties"]["user_id"]["maxLength"] == 256
    assert _body_schema(document, "/feedback") == "FeedbackBody"
    feedback = schemas["FeedbackBody"]
    assert set(feedback["required"]) == {"user_id", "item_id", "clicked", "request_id"}
    assert feedback["properties"]["clicked"]["type"] == "boolean"

    assert _response_schema(document, "/predict", "post", "200") == "PredictResponse"
    assert _response_schema(document, "/feedback", "post", "202") == "FeedbackAccepted"
    assert _response_schema(document, "/ab", "get", "200") == "ABSummary"
    assert _response_schema(document, "/ab/history", "get", "200") == "ABHistory"
    for path, method, statuses in (
        ("/predict", "post", ("400", "413", "415", "422", "503")),
        ("/feedback", "post", ("400", "403", "409", "410", "413", "415", "422", "503")),
    ):
        for status in statuses:
            assert _response_schema(document, path, method, status) == "ErrorBody", (path, status)

    # The documented shapes are the served ones: real answers validate against the served schema.
    body = {"user_id": "u1", "candidates": ["a", "b"], "history": ["c"]}
    _conforms(document, "PredictBody", body)
    answer = service.post("/predict", json.dumps(body).encode()).json()
    _conforms(document, "PredictResponse", answer)
    click = {"user_id": "u1", "item_id": "a", "clicked": True, "request_id": answer["request_id"]}
    _conforms(document, "FeedbackBody", click)
    accepted = service.post("/feedback", json.dumps(click).encode())
    assert accepted.status_code == 202
    _conforms(document, "FeedbackAccepted", accepted.json())
    for refused in (service.post("/feedback", json.dumps(click).encode()), service.post("/predict", b"[")):
        assert refused.status_code in (400, 409)
        _conforms(document, "ErrorBody", refused.json())
    invalid = service.post("/predict", json.dumps({"user_id": 7, "candidates": []}).encode())
    assert invalid.status_code == 422 and {d["field"] for d in invalid.json()["details"]} == {
        "user_id",
        "candidates",
    }
    _conforms(document, "ErrorBody", invalid.json())
    _conforms(document, "ABSummary", service.post_get("/ab"))
    _conforms(document, "ABHistory", service.post_get("/ab/history"))
    _conforms(document, "Health", service.post_get("/healthz"))
    with pytest.raises(jsonschema.ValidationError):  # and the schema is not vacuous
        _conforms(document, "PredictResponse", {**answer, "scores": "high"})


def test_docs_is_swagger_ui_served_from_this_origin(service):
    page = _get(service, "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in page.text and "'/openapi.json'" in page.text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/docs/static/") for s in sources), sources  # no CDN
    for source in sources:
        assert _get(service, source).status_code == 200, source


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_declared_json_is_refused_415_and_counted_for_feedback(service, content_type):
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"user_id": "u", "candidates": ["i"]}).encode()

    async def post(path: str):
        return await service.client.post(path, content=body, headers={**headers, **auth(service.keys, path)})

    for path in ("/predict", "/feedback"):
        response = service.loop.run_until_complete(post(path))
        assert response.status_code == 415 and "application/json" in response.json()["error"]
    assert service.post_get("/ab")["rejected_feedback"] == {"invalid_body": 1}


class _Markup(HTMLParser):
    """The tags and attributes of a page, to check it carries no inline script, style or handler."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data.strip()


def test_the_dashboard_page_is_static_with_a_strict_csp_and_only_its_own_assets(service):
    page = _get(service, "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"

    markup = _Markup()
    markup.feed(page.text)
    assert markup.script_text == ""  # no inline script or style: the CSP would block it anyway
    assert not [a for _, attrs in markup.tags for a in attrs if a.startswith("on") or a == "style"]
    referenced = [
        attrs.get("src") or attrs.get("href")
        for tag, attrs in markup.tags
        if tag in ("script", "link") and (attrs.get("src") or attrs.get("href"))
    ]
    assert len(referenced) == 4
    for url in referenced:
        assert url.startswith("dashboard/assets/"), url  # relative, same origin
        asset = _get(service, "/" + url)
        assert asset.status_code == 200 and asset.headers["content-security-policy"] == policy
        assert asset.headers["content-type"] == ASSETS[url.rsplit("/", 1)[1]][1]
    for hostile in ("../app.py", "..%2Fpage.py", "index.html", "nope.js"):
        # with the operator key: a path that normalises out of assets/ is then a 404, not a 401
        operator = {"authorization": f"Bearer {service.keys['operator']}"}
        refused = service.get(f"/dashboard/assets/{hostile}", headers=operator)
        assert refused.status_code == 404 and "error" in refused.json()


def test_the_dashboard_script_writes_data_as_text_only():
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function("):
        assert sink not in script, sink
    assert "textContent" in script and "hasOwnProperty" in script


def test_the_history_ring_is_bounded_and_records_snapshots_weights_and_the_canary(tmp_path):
    service = InProcessService(tmp_path)
    service.core.history = HistoryRing(ARMS, every_s=0.01, size=3)
    service.core.reconfigure({"weights": {"marn": 0.5, "dupn": 0.5}})  # the starting weights, into this ring
    try:
        for k in range(5):
            body = {"user_id": f"u{k}", "candidates": ["a", "b"]}
            answer = service.post("/predict", json.dumps(body).encode()).json()
            click = {
                "user_id": f"u{k}",
                "item_id": "a",
                "clicked": k % 2 == 0,
                "request_id": answer["request_id"],
            }
            assert service.post("/feedback", json.dumps(click).encode()).status_code == 202
            time.sleep(0.02)
            history = service.post_get("/ab/history")
        service.core.reconfigure({"weights": {"marn": 0.25, "dupn": 0.75}})
        time.sleep(0.02)
        history = service.post_get("/ab/history")
    finally:
        service.close()
    assert history["capacity"] == 3 and len(history["snapshots"]) == 3  # five and more taken, three kept
    times = [s["ts"] for s in history["snapshots"]]
    assert times == sorted(times)
    last = history["snapshots"][-1]
    assert last["weights"] == {"marn": 0.25, "dupn": 0.75}
    assert sum(last["arms"][a]["requests"] for a in ARMS) == 5
    assert sum(last["arms"][a]["feedback"] for a in ARMS) == 5
    assert sum(last["arms"][a]["clicks"] for a in ARMS) == 3
    assert last["canary"]["action"] == "hold" and history["canary_steps"] == [0.05, 0.25, 0.5, 1.0]
    for point in last["arms"].values():
        if point["ctr"] is not None:
            assert 0 <= point["ctr_low"] <= point["ctr"] <= point["ctr_high"] <= 1
    assert [c["weights"] for c in history["weight_changes"]] == [
        {"marn": 0.5, "dupn": 0.5},
        {"marn": 0.25, "dupn": 0.75},
    ]


def _arm(feedback: int, clicks: int, users: int, clicks_sq: int, feedback_sq: int, cross: int) -> ArmCounts:
    return ArmCounts(
        requests=feedback,
        errors=0,
        latency_ms=LatencyPercentiles(p50=None, p95=None, p99=None),
        feedback=feedback,
        clicks=clicks,
        ctr=clicks / feedback if feedback else None,
        clusters=ClusterCounts(
            users=users, clicks_sq=clicks_sq, feedback_sq=feedback_sq, clicks_x_feedback=cross
        ),
    )


def test_ctr_interval_is_the_clustered_normal_interval_floored_at_the_binomial():
    # 100 users with one event each: Σ(C - pN)² = 10 - 2·0.1·10 + 0.01·100 = 9, V = 100/99 · 9 / 100².
    low, high = ctr_interval(_arm(100, 10, 100, 10, 100, 10))
    half = Z_95 * (100 / 99 * 9 / 100**2) ** 0.5
    assert low == pytest.approx(0.1 - half) and high == pytest.approx(0.1 + half)
    # 10 users with 10 events each and the same clicks per user: clustered variance 0, binomial floor.
    low, high = ctr_interval(_arm(100, 10, 10, 10, 1000, 100))
    assert high - 0.1 == pytest.approx(Z_95 * (0.1 * 0.9 / 100) ** 0.5)
    # No clicks at all: the interval is [0, 0] (binomial 0), clipped, never below 0.
    assert ctr_interval(_arm(50, 0, 50, 0, 50, 0)) == (0.0, 0.0)
    assert ctr_interval(_arm(0, 0, 0, 0, 0, 0)) == (None, None)
