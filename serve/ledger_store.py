"""The A/B ledger's durable state: counts, the event log and the replay set, in a database.

``LedgerStore`` is the small interface the Serve ``Ledger`` deployment needs; ``SQLiteLedgerStore`` is the
embedded default (one file under the serve state dir, WAL, one transaction per router flush or feedback
batch). A Redis store for the cluster would implement the same methods (a MULTI/EXEC per batch, ``SET NX``
with an expiry for the replay set); none is written yet.

Exactly once: a router flush carries a batch id, stored in the same transaction as its counts, so a flush
re-sent after a ledger died between commit and reply is not counted twice. A feedback click is claimed
(request key, item) in the same transaction that counts it, with its claim id, so the same call delivered
twice counts once, and within its response's feedback and click limits. The store also keeps the
experiment's secret assignment salt, made with it.

``EventBuffer`` is the router's side: events waiting for the next flush, bounded (see its docstring).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from serve.ab import LATENCY_WINDOW, ABLedger, ArmCounters, new_salt
from serve.sequential import ClusterSums

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
BATCH_MEMORY_S = 86_400.0  # applied batch ids kept this long (a router retries for minutes, not days)

# (kind, ...) tuples: cheap to pickle through Ray.
#   ("request", user_id, arm, latency_ms, ok, shadow, unix_s)
#   ("weights", {arm: share}, unix_s)
#   ("rejected", reason, unix_s)
Event = tuple


@dataclass
class Batch:
    """One router flush: its events in order, plus what was folded into counts while the buffer was full."""

    batch_id: str
    events: list[Event]
    folded_requests: dict[str, list[int]] = field(default_factory=dict)  # "arm|shadow" -> [requests, errors]
    folded_rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    folded: int = 0  # events kept only as counts (no latency sample, no event-log row)


@dataclass(frozen=True)
class FeedbackClaim:
    request_key: str  # the request id's signature: unique per response
    user_id: str
    arm: str
    model_version: str
    item_id: str
    clicked: bool
    issued_at: float
    # One per /feedback call: the same claim delivered twice (Serve re-sending a call whose reply was lost
    # when the ledger replica died) is accepted once and not refused as a replay of itself.
    claim_id: str


# replayed: this (response, item) was counted before; response_limit: the response already has
# serve.max_feedback_per_response items counted (more than a slate shows); click_limit: ... that many clicks
FeedbackOutcome = Literal["accepted", "replayed", "response_limit", "click_limit"]


class LedgerStore(Protocol):
    def apply(self, batch: Batch) -> bool:
        """Count a router flush in one transaction; False when this batch id was applied before."""

    def claim_feedback(self, claims: list[FeedbackClaim]) -> list[FeedbackOutcome]:
        """Count each claim whose (request, item) is new; refuse (and count) the rest; one transaction."""

    def summary(self) -> dict[str, Any]:
        """``GET /ab``'s numbers (ABLedger.summary's shape) plus rejected feedback per reason."""

    def assignment_salt(self) -> str:
        """The experiment's secret assignment salt (hex), made with the store: every router reads it."""

    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    scope TEXT NOT NULL, arm TEXT NOT NULL,  -- scope: total | step (since the last weight change) | shadow
    requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    feedback INTEGER NOT NULL DEFAULT 0, clicks INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, arm)
);
CREATE TABLE IF NOT EXISTS user_feedback (  -- per user: the canary test's clustered variance
    scope TEXT NOT NULL, arm TEXT NOT NULL, user_id TEXT NOT NULL,
    clicks INTEGER NOT NULL, feedback INTEGER NOT NULL,
    PRIMARY KEY (scope, arm, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cluster_sums (  -- user_feedback's aggregates, kept with it: GET /ab reads O(arms)
    scope TEXT NOT NULL, arm TEXT NOT NULL,
    users INTEGER NOT NULL, clicks_sq INTEGER NOT NULL, feedback_sq INTEGER NOT NULL,
    clicks_x_feedback INTEGER NOT NULL,
    PRIMARY KEY (scope, arm)
);
CREATE TABLE IF NOT EXISTS rejected (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (  -- the event log: every request, feedback, weight change, rejection
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
    user_id TEXT, arm TEXT, latency_ms REAL, ok INTEGER, shadow INTEGER,
    item_id TEXT, clicked INTEGER, detail TEXT
);
CREATE INDEX IF NOT EXISTS events_latency ON events (kind, arm, shadow, ok, id);
CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, applied_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    request_key TEXT NOT NULL, item_id TEXT NOT NULL, issued_at REAL NOT NULL, claim_id TEXT,
    PRIMARY KEY (request_key, item_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_issued ON seen (issued_at);
CREATE TABLE IF NOT EXISTS responses (  -- per response: what its feedback has counted so far (the limits)
    request_key TEXT PRIMARY KEY, feedback INTEGER NOT NULL, clicks INTEGER NOT NULL, issued_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS responses_issued ON responses (issued_at);
"""


# The event log's newest rows kept (80-320 bytes each: about 0.2-0.6 GiB, inside the cluster's 1 GiB volume)
MAX_EVENT_ROWS = 2_000_000


class SQLiteLedgerStore:
    """The ledger in one SQLite file, WAL with synchronous=NORMAL: a commit survives the ledger process dying
    (a crash, ``ray.kill``), the failure the replica restarts cover; a power cut or kernel crash may undo
    the commits since the last WAL checkpoint. FULL would fsync every commit (about 4 ms here, with the
    disk shared with Feast's online store), for a machine failure the single-file store cannot survive
    anyway (a Redis or Postgres store replicates; see LedgerStore)."""

    def __init__(
        self,
        path: Path,
        arms: list[str],
        replay_window_s: float,
        max_event_rows: int = MAX_EVENT_ROWS,
        max_feedback_per_response: int = 50,
        max_clicks_per_response: int = 5,
    ):
        self.path, self.arms, self.replay_window_s = Path(path), list(arms), replay_window_s
        self.max_event_rows = max_event_rows
        self.max_feedback_per_response = max_feedback_per_response
        self.max_clicks_per_response = max_clicks_per_response
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # User ids and clicks: readable by this user only (SQLite gives -wal and -shm the file's mode).
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)  # idempotent; executescript commits on its own
        if "claim_id" not in {row[1] for row in self.db.execute("PRAGMA table_info(seen)")}:
            self.db.execute("ALTER TABLE seen ADD COLUMN claim_id TEXT")  # a ledger from before claim ids
        with self._transaction():
            if self._meta("cluster_sums") is None:  # a ledger from before cluster_sums: summed once here
                self.db.execute("DELETE FROM cluster_sums")
                self.db.execute(
                    "INSERT INTO cluster_sums SELECT scope, arm, COUNT(*), SUM(clicks * clicks), "
                    "SUM(feedback * feedback), SUM(clicks * feedback) FROM user_feedback GROUP BY scope, arm"
                )
                self._set_meta("cluster_sums", "kept")
        with self._transaction():
            found = self._meta("schema")
            if found is not None and found != SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: ledger schema {found}, this code writes {SCHEMA_VERSION}")
            self._set_meta("schema", SCHEMA_VERSION)
            if self._meta("assignment_salt") is None:  # one per ledger, that is per experiment
                self._set_meta("assignment_salt", new_salt())

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _add(self, scope: str, arm: str, **deltas: int) -> None:
        columns = sorted(deltas)  # a fixed set of column names, never user input
        assert set(columns) <= {"requests", "errors", "feedback", "clicks"}, columns
        self.db.execute(
            f"INSERT INTO counters (scope, arm, {', '.join(columns)}) VALUES (?, ?{', ?' * len(columns)}) "
            f"ON CONFLICT (scope, arm) DO UPDATE SET "
            + ", ".join(f"{c} = {c} + excluded.{c}" for c in columns),
            (scope, arm, *(deltas[c] for c in columns)),
        )

    def _reject(self, reason: str, count: int = 1) -> None:
        self.db.execute(
            "INSERT INTO rejected (reason, count) VALUES (?, ?) "
            "ON CONFLICT (reason) DO UPDATE SET count = count + excluded.count",
            (reason, count),
        )

    def _count_request(self, arm: str, shadow: bool, requests: int, errors: int) -> None:
        for scope in ("shadow",) if shadow else ("total", "step"):
            self._add(scope, arm, requests=requests, errors=errors)

    def _weights_changed(self, weights: dict[str, float], now: float) -> None:
        known = self._meta("weights")
        if known is not None and json.loads(known) == weights:
            return  # a router restart re-announcing the same weights: the step goes on
        if known is not None:
            self.db.execute("DELETE FROM counters WHERE scope = 'step'")
            self.db.execute("DELETE FROM user_feedback WHERE scope = 'step'")
            self.db.execute("DELETE FROM cluster_sums WHERE scope = 'step'")
        self._set_meta("weights", json.dumps(weights))
        cursor = self.db.execute(
            "INSERT INTO events (ts, kind, detail) VALUES (?, 'weights', ?)", (now, json.dumps(weights))
        )
        self._set_meta("step_start_event", str(cursor.lastrowid))

    def apply(self, batch: Batch) -> bool:
        now = time.time()
        with self._transaction():
            fresh = self.db.execute(
                "INSERT OR IGNORE INTO batches (batch_id, applied_at) VALUES (?, ?)", (batch.batch_id, now)
            ).rowcount
            if not fresh:
                return False
            for event in batch.events:
                kind = event[0]
                if kind == "request":
                    _, user_id, arm, latency_ms, ok, shadow, ts = event
                    self._count_request(arm, shadow, 1, int(not ok))
                    self.db.execute(
                        "INSERT INTO events (ts, kind, user_id, arm, latency_ms, ok, shadow) "
                        "VALUES (?, 'request', ?, ?, ?, ?, ?)",
                        (ts, user_id, arm, latency_ms, int(ok), int(shadow)),
                    )
                elif kind == "weights":
                    self._weights_changed(event[1], event[2])
                elif kind == "rejected":
                    self._reject(event[1])
                    self.db.execute(
                        "INSERT INTO events (ts, kind, detail) VALUES (?, 'rejected', ?)",
                        (event[2], event[1]),
                    )
                else:
                    raise ValueError(f"unknown ledger event kind {kind!r}")
            for key, (requests, errors) in batch.folded_requests.items():
                arm, shadow = key.rsplit("|", 1)
                self._count_request(arm, shadow == "1", requests, errors)
            for reason, count in batch.folded_rejected.items():
                self._reject(reason, count)
            if batch.folded:
                previous = int(self._meta("events_folded") or 0)
                self._set_meta("events_folded", str(previous + batch.folded))
            self.db.execute("DELETE FROM batches WHERE applied_at < ?", (now - BATCH_MEMORY_S,))
            self._prune_events()
        return True

    def claim_feedback(self, claims: list[FeedbackClaim]) -> list[FeedbackOutcome]:
        now, outcomes = time.time(), []
        with self._transaction():
            for claim in claims:
                refused = self._refusal(claim)
                if refused == "delivered":  # this very claim was counted already: answer as then
                    outcomes.append("accepted")
                    continue
                if refused is not None:
                    self._reject(refused)
                    outcomes.append(refused)
                    continue
                self.db.execute(
                    "INSERT INTO seen (request_key, item_id, issued_at, claim_id) VALUES (?, ?, ?, ?)",
                    (claim.request_key, claim.item_id, claim.issued_at, claim.claim_id),
                )
                self.db.execute(
                    "INSERT INTO responses (request_key, feedback, clicks, issued_at) VALUES (?, 1, ?, ?) "
                    "ON CONFLICT (request_key) DO UPDATE SET feedback = feedback + 1, "
                    "clicks = clicks + excluded.clicks",
                    (claim.request_key, int(claim.clicked), claim.issued_at),
                )
                for scope in ("total", "step"):
                    self._add(scope, claim.arm, feedback=1, clicks=int(claim.clicked))
                    self._add_user_feedback(scope, claim.arm, claim.user_id, int(claim.clicked))
                self.db.execute(
                    "INSERT INTO events (ts, kind, user_id, arm, item_id, clicked, detail) "
                    "VALUES (?, 'feedback', ?, ?, ?, ?, ?)",
                    (
                        now,
                        claim.user_id,
                        claim.arm,
                        claim.item_id,
                        int(claim.clicked),
                        claim.model_version,
                    ),
                )
                outcomes.append("accepted")
            # Past the window a request id is refused as expired before it gets here: forget its items.
            self.db.execute("DELETE FROM seen WHERE issued_at < ?", (now - self.replay_window_s,))
            self.db.execute("DELETE FROM responses WHERE issued_at < ?", (now - self.replay_window_s,))
            self._prune_events()
        return outcomes

    def _add_user_feedback(self, scope: str, arm: str, user_id: str, clicked: int) -> None:
        """One more feedback event of ``user_id``: its row, and the arm's cluster sums moved by the change
        of that row (as ``ClusterSums.add`` does in memory), so that no read has to scan every user."""
        clicks, shown = self.db.execute(
            "SELECT clicks, feedback FROM user_feedback WHERE scope = ? AND arm = ? AND user_id = ?",
            (scope, arm, user_id),
        ).fetchone() or (0, 0)
        new_clicks, new_shown = clicks + clicked, shown + 1
        self.db.execute(
            "INSERT INTO user_feedback (scope, arm, user_id, clicks, feedback) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (scope, arm, user_id) DO UPDATE SET clicks = excluded.clicks, "
            "feedback = excluded.feedback",
            (scope, arm, user_id, new_clicks, new_shown),
        )
        deltas = (
            int(shown == 0),
            new_clicks**2 - clicks**2,
            new_shown**2 - shown**2,
            new_clicks * new_shown - clicks * shown,
        )
        self.db.execute(
            "INSERT INTO cluster_sums (scope, arm, users, clicks_sq, feedback_sq, clicks_x_feedback) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, arm) DO UPDATE SET "
            "users = users + excluded.users, clicks_sq = clicks_sq + excluded.clicks_sq, "
            "feedback_sq = feedback_sq + excluded.feedback_sq, "
            "clicks_x_feedback = clicks_x_feedback + excluded.clicks_x_feedback",
            (scope, arm, *deltas),
        )

    def _refusal(self, claim: FeedbackClaim) -> FeedbackOutcome | Literal["delivered"] | None:
        """Why this claim is not counted, or None; "delivered" when this same claim was counted before. A
        response's feedback is bounded: a genuine request id must not let one caller write 1,000 clicks (one
        per candidate) into the test the canary acts on."""
        seen = self.db.execute(
            "SELECT claim_id FROM seen WHERE request_key = ? AND item_id = ?",
            (claim.request_key, claim.item_id),
        ).fetchone()
        if seen is not None:
            return "delivered" if seen[0] == claim.claim_id else "replayed"
        feedback, clicks = self.db.execute(
            "SELECT feedback, clicks FROM responses WHERE request_key = ?", (claim.request_key,)
        ).fetchone() or (0, 0)
        if feedback >= self.max_feedback_per_response:
            return "response_limit"
        if claim.clicked and clicks >= self.max_clicks_per_response:
            return "click_limit"
        return None

    def assignment_salt(self) -> str:
        return self._meta("assignment_salt")  # type: ignore[return-value]  # set in __init__

    def _prune_events(self) -> None:
        """Keep the newest ``max_event_rows`` of the event log: unbounded, it filled the volume (a flood of
        requests or feedback in an hour, ordinary traffic in days), after which every write failed and the
        A/B test froze. The counters the canary reads are kept apart and lose nothing; the dropped rows are
        counted (``events_pruned``)."""
        newest = self.db.execute("SELECT max(id) FROM events").fetchone()[0]
        if newest is None or newest <= self.max_event_rows:
            return
        dropped = self.db.execute(
            "DELETE FROM events WHERE id <= ?", (newest - self.max_event_rows,)
        ).rowcount
        if dropped:
            self._set_meta("events_pruned", str(int(self._meta("events_pruned") or 0) + dropped))

    def _counters(self, scope: str, arm: str, since_event: int) -> ArmCounters:
        row = self.db.execute(
            "SELECT requests, errors, feedback, clicks FROM counters WHERE scope = ? AND arm = ?",
            (scope, arm),
        ).fetchone() or (0, 0, 0, 0)
        latencies = self.db.execute(
            "SELECT latency_ms FROM events WHERE kind = 'request' AND arm = ? AND shadow = ? AND ok = 1 "
            "AND id > ? ORDER BY id DESC LIMIT ?",
            (arm, int(scope == "shadow"), since_event, LATENCY_WINDOW),
        ).fetchall()
        users, clicks_sq, feedback_sq, clicks_x_feedback = self.db.execute(
            "SELECT users, clicks_sq, feedback_sq, clicks_x_feedback FROM cluster_sums "
            "WHERE scope = ? AND arm = ?",
            (scope, arm),
        ).fetchone() or (0, 0, 0, 0)
        counters = ArmCounters(requests=row[0], errors=row[1], shown=row[2], clicks=row[3])
        counters.clusters = ClusterSums(
            users=users,
            clicks_sq=int(clicks_sq),
            feedback_sq=int(feedback_sq),
            clicks_x_feedback=int(clicks_x_feedback),
        )
        counters.latencies_ms = deque((value for (value,) in reversed(latencies)), maxlen=LATENCY_WINDOW)
        return counters

    def summary(self) -> dict[str, Any]:
        self.db.execute("BEGIN")  # one consistent snapshot for every query below
        try:
            view = ABLedger(self.arms)
            weights = self._meta("weights")
            view.weights = None if weights is None else json.loads(weights)
            step_start = int(self._meta("step_start_event") or 0)
            for arm in self.arms:
                view.total[arm] = self._counters("total", arm, 0)
                view.step[arm] = self._counters("step", arm, step_start)
                view.shadow[arm] = self._counters("shadow", arm, 0)
            rejected = dict(self.db.execute("SELECT reason, count FROM rejected ORDER BY reason").fetchall())
            folded = int(self._meta("events_folded") or 0)
            pruned = int(self._meta("events_pruned") or 0)
        finally:
            self.db.execute("COMMIT")
        return {
            **view.summary(),
            "rejected_feedback": rejected,
            "events_folded": folded,  # counted, but with no latency sample or log row (router buffer full)
            "events_pruned": pruned,  # log rows dropped as the oldest beyond max_event_rows (counted before)
        }

    def close(self) -> None:
        self.db.close()


class EventBuffer:
    """The router's events between flushes, bounded at ``limit`` while the ledger is down.

    Serving never waits for the ledger, and nothing is dropped silently: past ``limit`` a request or a
    rejection is folded into per-arm (per-reason) counts, so every count still reaches the ledger and only
    its latency sample and event-log row are lost; the number folded is logged and shown in ``GET /ab``
    (``events_folded``). Memory stays O(limit + arms). Weight changes are never folded.
    A flush that fails is retried with the same batch id (the ledger ignores a batch it already counted).
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the event buffer limit must be at least 1, got {limit}")
        self.limit = limit
        self.prefix = uuid.uuid4().hex  # per router replica: batch ids never collide across replicas
        self.sequence = 0
        self.unsent: Batch | None = None  # a batch the ledger did not acknowledge, resent first
        self._fresh = self._new_batch()

    def _new_batch(self) -> Batch:
        self.sequence += 1
        return Batch(f"{self.prefix}-{self.sequence}", [])

    def __len__(self) -> int:
        return len(self._fresh.events) + (len(self.unsent.events) if self.unsent else 0)

    def add(self, event: Event) -> None:
        batch = self._fresh
        if event[0] == "weights" or len(self) < self.limit:
            batch.events.append(event)
            return
        if batch.folded == 0:
            log.warning(
                "router event buffer full (%d): folding events into counts until it drains", self.limit
            )
        batch.folded += 1
        if event[0] == "request":
            _, _, arm, _, ok, shadow, _ = event
            counts = batch.folded_requests.setdefault(f"{arm}|{int(shadow)}", [0, 0])
            counts[0] += 1
            counts[1] += int(not ok)
        elif event[0] == "rejected":
            batch.folded_rejected[event[1]] = batch.folded_rejected.get(event[1], 0) + 1
        else:
            raise ValueError(f"unknown ledger event kind {event[0]!r}")

    def take(self) -> Batch | None:
        """The next batch to send (the unacknowledged one first); None when there is nothing."""
        if self.unsent is None:
            batch = self._fresh
            if not batch.events and not batch.folded:
                return None
            self.unsent, self._fresh = batch, self._new_batch()
        return self.unsent

    def acknowledged(self, batch: Batch) -> None:
        if self.unsent is batch:
            self.unsent = None
