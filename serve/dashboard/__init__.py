"""The A/B dashboard: ``GET /dashboard``, a self-contained page that polls ``GET /ab/history`` and draws it.

``history`` keeps the time series (a bounded ring of periodic snapshots in each router replica); ``page``
serves the page and its assets (our script and the vendored uPlot, no CDN) under a strict
Content-Security-Policy.
"""
