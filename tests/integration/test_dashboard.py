"""GET /dashboard in a real headless Chromium, against the router's HTTP app served by uvicorn on 127.0.0.1.

The service is ``asgi_app(RouterCore)`` (the routes every Serve router replica builds) over a real SQLite
ledger; only the arms are replaced, by scorers that score from the item ids after an arm-specific delay (the
page is under test here, not the models: tests/integration/test_serve.py runs the whole Serve app). Bounded
traffic (predicts, feedback and one weight change) fills the history ring; Chromium (Debian's package,
installed by .ci/run) loads the page with a virtual-time budget, and the test reads the DOM it dumps (the
page marks itself ready once every chart has drawn two points) and a screenshot saved under tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

from marn.config import ServeConfig
from serve.app import LocalLedger, RouterCore, asgi_app
from serve.callers import callers_entries, new_caller_keys, parse_callers
from serve.dashboard.history import HistoryRing
from serve.ledger_store import SQLiteLedgerStore
from serve.scoring import ScoreRequest

pytestmark = pytest.mark.slow

ARMS = ["marn", "dupn"]
ARM_COLOURS = {"marn": (0x1F, 0x77, 0xB4), "dupn": (0xD6, 0x27, 0x28)}  # dashboard.js's PALETTE, in order
DELAY_S = {"marn": 0.004, "dupn": 0.009}
CLICK_RATE = {"marn": 0.30, "dupn": 0.20}
USERS = 60
REQUESTS_PER_PHASE = 60
TRAFFIC_DEADLINE_S = 60
WINDOW = (1280, 1200)
CHROMIUM_TIMEOUT_S = 90


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI") == "true":
        pytest.fail("no chromium on PATH under CI=true: .ci/run installs Debian's chromium package")
    pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it in CI)")


async def delayed_scorer(arm: str, work: ScoreRequest) -> dict[str, Any]:
    await asyncio.sleep(DELAY_S[arm] * (1 + random.random()))
    return {"arm": arm, "model_version": "v1", "scores": [(hash(i) % 1000) / 1000 for i in work.candidates]}


class UvicornService:
    """asgi_app(core) under uvicorn on 127.0.0.1 at an ephemeral port, in a thread with its own loop."""

    def __init__(self, tmp: Path):
        self.store = SQLiteLedgerStore(tmp / "ledger.sqlite", ARMS, replay_window_s=3660)
        history = HistoryRing(ARMS, every_s=0.25, size=400)
        self.keys = new_caller_keys()
        callers = parse_callers(callers_entries(self.keys, "test"))
        self.core = RouterCore(
            ARMS, delayed_scorer, LocalLedger(self.store), ServeConfig(), b"k" * 32, callers, history
        )
        self.core.reconfigure({"weights": {"marn": 0.5, "dupn": 0.5}})
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(asgi_app(self.core), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.server.serve(sockets=[self.socket]),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def set_weights(self, weights: dict[str, float]) -> None:
        """On the server's loop: the core is not shared across threads."""
        done = threading.Event()

        def apply() -> None:
            self.core.reconfigure({"weights": weights})
            done.set()

        self.loop.call_soon_threadsafe(apply)
        assert done.wait(10)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()
        self.store.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[UvicornService]:
    running = UvicornService(tmp_path_factory.mktemp("dashboard"))
    yield running
    running.close()


def send_traffic(url: str, key: str, phase: int, rng: random.Random) -> dict[str, int]:
    """REQUESTS_PER_PHASE predicts, each followed by feedback on its first candidate; bounded in time too."""
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + TRAFFIC_DEADLINE_S
    with httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {key}"}) as client:
        for n in range(REQUESTS_PER_PHASE):
            if time.monotonic() > deadline:
                break
            user = f"user-{(n * 7 + phase) % USERS}"
            body = {"user_id": user, "candidates": [f"item-{phase}-{n}-{k}" for k in range(5)]}
            answer = client.post("/predict", json=body)
            statuses[f"predict {answer.status_code}"] = statuses.get(f"predict {answer.status_code}", 0) + 1
            served = answer.json()
            click = {
                "user_id": user,
                "item_id": body["candidates"][0],
                "clicked": rng.random() < CLICK_RATE[served["arm"]],
                "request_id": served["request_id"],
            }
            fed = client.post("/feedback", json=click)
            statuses[f"feedback {fed.status_code}"] = statuses.get(f"feedback {fed.status_code}", 0) + 1
    return statuses


def run_chromium(page: str, out: Path, *mode: str, budget_ms: int) -> subprocess.CompletedProcess:
    """Headless Chromium on the ``page`` URL; every host but 127.0.0.1 resolves to nothing, background
    traffic off."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # root in CI; the page is ours and the network loopback only
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={out / 'chromium-profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={budget_ms}",
        *mode,
        page,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def colour_pixels(image: Image.Image, rgb: tuple[int, int, int]) -> int:
    """Pixels within 12 of ``rgb`` on every channel: the cores of lines drawn in that colour."""
    return sum(
        count
        for count, (r, g, b) in image.getcolors(maxcolors=WINDOW[0] * WINDOW[1])
        if max(abs(r - rgb[0]), abs(g - rgb[1]), abs(b - rgb[2])) <= 12
    )


def test_the_dashboard_draws_every_chart_in_a_real_browser(service, tmp_path):
    # Before any traffic the history has no series: the page must not claim to be ready.
    keyless = run_chromium(f"{service.url}/dashboard", tmp_path, "--dump-dom", budget_ms=3000).stdout
    assert "needs the operator key" in keyless and 'data-ready="true"' not in keyless, keyless[:2000]
    client_key = f"{service.url}/dashboard#key={service.keys['client']}"  # a client may not read /ab
    refused = run_chromium(client_key, tmp_path, "--dump-dom", budget_ms=3000).stdout
    assert "the key was refused (HTTP 403)" in refused, refused[:2000]
    page = f"{service.url}/dashboard#key={service.keys['operator']}"
    empty = run_chromium(page, tmp_path, "--dump-dom", budget_ms=3000).stdout
    assert service.keys["operator"] not in empty  # the key left the address bar
    assert re.search(r'id="status"[^>]*>\d+ snapshots', empty), empty[:2000]  # it read ab/history
    assert 'data-ready="true"' not in empty

    rng = random.Random(7)
    first = send_traffic(service.url, service.keys["client"], 0, rng)
    service.set_weights({"marn": 0.25, "dupn": 0.75})  # a ramp step: the weights chart and canary history
    second = send_traffic(service.url, service.keys["client"], 1, rng)
    for statuses in (first, second):
        assert statuses == {"predict 200": REQUESTS_PER_PHASE, "feedback 202": REQUESTS_PER_PHASE}, statuses
    operator = {"authorization": f"Bearer {service.keys['operator']}"}
    history = httpx.get(f"{service.url}/ab/history", headers=operator, timeout=30).json()
    assert len(history["snapshots"]) >= 4 and len(history["weight_changes"]) == 2  # one every 0.25 s

    screenshot = tmp_path / "dashboard.png"
    dom = run_chromium(page, tmp_path, "--dump-dom", f"--screenshot={screenshot}", budget_ms=10_000).stdout
    (tmp_path / "dashboard.html").write_text(dom)  # beside the screenshot, for a failure's post-mortem
    assert re.search(r'<html[^>]*data-ready="true"', dom), dom[:2000]
    assert "MARN A/B dashboard (ready)" in dom
    for chart in ("requests", "ctr", "latency", "weights"):
        block = re.search(rf'id="chart-{chart}".*?</section>', dom, re.S)
        assert block and "<canvas" in block.group(0), f"chart {chart} has no canvas"
    assert "weights applied" in dom and "decision: hold" in dom  # the canary history table
    assert "25.0%" in dom and "75.0%" in dom  # the current weights

    assert screenshot.is_file() and screenshot.stat().st_size > 20_000
    with Image.open(screenshot) as opened:
        image = opened.convert("RGB")
    assert image.size == WINDOW
    assert len(image.getcolors(maxcolors=WINDOW[0] * WINDOW[1])) > 500  # text, lines, bands: not blank
    for arm, rgb in ARM_COLOURS.items():  # the lines in each arm's colour (the weight bars are paler)
        assert colour_pixels(image, rgb) > 1500, f"{arm}'s lines are missing from {screenshot}"
