"""``GET /dashboard`` and its assets: fixed files read once when the app is built, served under a strict CSP.

The page is static: its script fetches ``ab/history`` (same origin, with the operator key the page's
user gives it in the URL fragment: ``dashboard#key=KEY``, kept in the tab's sessionStorage) and writes
every value with ``textContent`` or into canvas charts, never as markup, so the data cannot inject script;
the policy allows scripts, styles and fetches from this origin only (no inline script, no CDN: the cluster
and CI may be offline), and no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC = Path(__file__).with_name("static")
UPLOT = "vendor/uplot"  # uPlot 1.6.32, MIT (vendor/uplot/README.md)

# URL name -> (file under static/, media type): these and nothing else are served.
ASSETS = {
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "uPlot.iife.min.js": (f"{UPLOT}/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": (f"{UPLOT}/uPlot.min.css", "text/css; charset=utf-8"),
    "uPlot-LICENSE.txt": (f"{UPLOT}/LICENSE", "text/plain; charset=utf-8"),
}

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",  # uPlot sizes its elements through the CSSOM, which style-src does not block
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_dashboard(app: FastAPI) -> None:
    """``GET /dashboard`` (the page) and ``GET /dashboard/assets/{name}`` (its scripts and styles)."""
    page = (STATIC / "index.html").read_bytes()
    assets = {name: ((STATIC / path).read_bytes(), media) for name, (path, media) in ASSETS.items()}

    @app.get(
        "/dashboard",
        response_class=Response,
        responses={200: {"content": {"text/html": {}}, "description": "the dashboard page"}},
        summary="The A/B dashboard (HTML; polls GET /ab/history)",
    )
    async def dashboard() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/dashboard/assets/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            raise HTTPException(404, "no such dashboard asset")
        body, media = found
        return Response(body, media_type=media, headers=SECURITY_HEADERS)
