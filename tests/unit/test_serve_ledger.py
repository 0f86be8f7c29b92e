"""The durable ledger (serve/ledger_store.py) and the router's bounded event buffer, without Ray."""

from __future__ import annotations

import random
import sqlite3
import uuid

import pytest

from serve.ab import ABLedger
from serve.ledger_store import Batch, EventBuffer, FeedbackClaim, SQLiteLedgerStore

ARMS = ["marn", "dupn"]


def _store(tmp_path, name: str = "ledger.sqlite") -> SQLiteLedgerStore:
    return SQLiteLedgerStore(tmp_path / name, ARMS, replay_window_s=3600)


def _request(user: str, arm: str, latency_ms: float = 10.0, ok: bool = True, shadow: bool = False) -> tuple:
    return ("request", user, arm, latency_ms, ok, shadow, 1.0)


def _claim(key: str, user: str, arm: str, item: str, clicked: bool, issued_at: float = 1e12) -> FeedbackClaim:
    return FeedbackClaim(key, user, arm, "v1", item, clicked, issued_at, uuid.uuid4().hex)


def test_counts_survive_closing_and_reopening_the_file_in_wal_mode(tmp_path):
    store = _store(tmp_path)
    events = [("weights", {"marn": 0.5, "dupn": 0.5}, 1.0), _request("u1", "marn", 12.0)]
    events += [_request("u2", "dupn", 30.0, ok=False), _request("u1", "dupn", 50.0, shadow=True)]
    assert store.apply(Batch("b1", events))
    assert store.claim_feedback(
        [_claim("r1", "u1", "marn", "i1", True), _claim("r1", "u1", "marn", "i2", False)]
    )
    before = store.summary()
    store.close()
    reopened = _store(tmp_path)
    assert reopened.summary() == before
    marn, dupn = before["arms"]["marn"], before["arms"]["dupn"]
    assert (marn["requests"], marn["feedback"], marn["clicks"], marn["latency_ms"]["p50"]) == (1, 2, 1, 12.0)
    assert (dupn["requests"], dupn["errors"], dupn["shadow"]["requests"]) == (1, 1, 1)
    mode = sqlite3.connect(tmp_path / "ledger.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert (tmp_path / "ledger.sqlite").stat().st_mode & 0o077 == 0  # user ids: not world-readable


def test_a_resent_batch_is_counted_once(tmp_path):
    store = _store(tmp_path)
    batch = Batch("router-a-1", [_request("u1", "marn")])
    assert store.apply(batch) is True
    assert store.apply(batch) is False  # the ledger died after committing, the router sent it again
    assert store.summary()["arms"]["marn"]["requests"] == 1


def test_each_request_item_pair_counts_once_and_replays_are_counted_as_rejected(tmp_path):
    store = _store(tmp_path)
    first = [_claim("r1", "u1", "dupn", "i1", True), _claim("r1", "u1", "dupn", "i1", False)]
    assert store.claim_feedback(first) == ["accepted", "replayed"]
    assert store.claim_feedback([_claim("r1", "u1", "dupn", "i2", False)]) == ["accepted"]
    assert store.claim_feedback([_claim("r2", "u1", "dupn", "i1", False)]) == ["accepted"]  # another response
    summary = store.summary()
    assert (summary["arms"]["dupn"]["feedback"], summary["arms"]["dupn"]["clicks"]) == (3, 1)
    assert summary["rejected_feedback"] == {"replayed": 1}


def test_the_same_weights_after_a_router_restart_keep_the_step_a_change_resets_it(tmp_path):
    store = _store(tmp_path)
    store.apply(Batch("a-1", [("weights", {"marn": 0.05, "dupn": 0.95}, 1.0), _request("u1", "marn")]))
    store.claim_feedback([_claim("r1", "u1", "marn", "i1", True)])
    store.apply(Batch("b-1", [("weights", {"marn": 0.05, "dupn": 0.95}, 2.0)]))  # a restarted router
    step = store.summary()["arms"]["marn"]["since_weight_change"]
    assert (step["requests"], step["feedback"], step["clusters"]["users"]) == (1, 1, 1)
    store.apply(Batch("b-2", [("weights", {"marn": 0.25, "dupn": 0.75}, 3.0)]))
    summary = store.summary()
    step = summary["arms"]["marn"]["since_weight_change"]
    assert (step["requests"], step["feedback"], step["clusters"]["users"], step["latency_ms"]["p50"]) == (
        0,
        0,
        0,
        None,
    )
    assert summary["arms"]["marn"]["requests"] == 1 and summary["weights"] == {"marn": 0.25, "dupn": 0.75}


def test_per_user_sums_equal_the_in_memory_ledgers(tmp_path):
    store, memory = _store(tmp_path), ABLedger(ARMS)
    clicks = [("u1", True), ("u1", False), ("u1", True), ("u2", False), ("u3", True), ("u3", True)]
    for k, (user, clicked) in enumerate(clicks):
        store.claim_feedback([_claim(f"r{k}", user, "marn", "i1", clicked)])
        memory.record_feedback(user, clicked, fallback_arm="marn")
    durable, expected = store.summary()["arms"]["marn"], memory.summary()["arms"]["marn"]
    assert durable["clusters"] == expected["clusters"] and durable["clusters"]["users"] == 3
    assert durable["since_weight_change"]["clusters"] == expected["since_weight_change"]["clusters"]
    assert durable["ctr"] == expected["ctr"]


def test_expired_request_keys_are_forgotten(tmp_path):
    store = SQLiteLedgerStore(tmp_path / "l.sqlite", ARMS, replay_window_s=60)
    store.claim_feedback([_claim("old", "u1", "marn", "i1", True, issued_at=1.0)])  # long past the window
    store.claim_feedback([_claim("new", "u1", "marn", "i1", True)])
    keys = [row[0] for row in store.db.execute("SELECT request_key FROM seen")]
    assert keys == ["new"]


def test_the_buffer_is_bounded_and_folds_overflow_into_counts_without_losing_one(tmp_path):
    buffer = EventBuffer(limit=10)
    buffer.add(("weights", {"marn": 0.5, "dupn": 0.5}, 1.0))
    for k in range(1000):
        buffer.add(_request(f"u{k}", ARMS[k % 2], ok=k % 10 != 0))
    for _ in range(7):
        buffer.add(("rejected", "forged", 1.0))
    assert len(buffer) == 10
    batch = buffer.take()
    assert batch.folded == 1000 + 7 + 1 - 10
    store = _store(tmp_path)
    assert store.apply(batch)
    summary = store.summary()
    assert summary["arms"]["marn"]["requests"] + summary["arms"]["dupn"]["requests"] == 1000
    assert summary["arms"]["marn"]["errors"] + summary["arms"]["dupn"]["errors"] == 100
    assert summary["rejected_feedback"] == {"forged": 7} and summary["events_folded"] == batch.folded


def test_an_unacknowledged_batch_is_resent_with_its_id_before_newer_events(tmp_path):
    buffer = EventBuffer(limit=100)
    buffer.add(_request("u1", "marn"))
    first = buffer.take()
    buffer.add(_request("u2", "dupn"))  # arrives while the ledger is down
    assert buffer.take() is first  # the send failed: the same batch, the same id, again
    buffer.acknowledged(first)
    second = buffer.take()
    assert second.batch_id != first.batch_id and [e[1] for e in second.events] == ["u2"]
    buffer.acknowledged(second)
    assert buffer.take() is None and len(buffer) == 0
    with pytest.raises(ValueError):
        EventBuffer(limit=0)


def test_the_event_log_keeps_its_newest_rows_and_the_counters_lose_nothing(tmp_path):
    store = SQLiteLedgerStore(tmp_path / "capped.sqlite", ARMS, replay_window_s=3600, max_event_rows=5)
    for b in range(3):
        assert store.apply(Batch(f"b{b}", [_request(f"u{b}{k}", "marn", 10.0 + b) for k in range(4)]))
    outcomes = store.claim_feedback([_claim("r1", "u00", "marn", f"i{k}", k == 0) for k in range(3)])
    assert outcomes == ["accepted"] * 3
    rows = store.db.execute("SELECT kind, latency_ms FROM events ORDER BY id").fetchall()
    assert len(rows) == 5  # 12 requests + 3 feedback logged, the newest 5 kept
    assert [kind for kind, _ in rows] == ["request", "request", "feedback", "feedback", "feedback"]
    summary = store.summary()
    marn = summary["arms"]["marn"]
    assert (marn["requests"], marn["feedback"], marn["clicks"]) == (12, 3, 1)  # counted before pruning
    assert summary["events_pruned"] == 10
    assert marn["latency_ms"]["p50"] == 12.0  # from the rows kept: the last batch's


def test_the_same_claim_delivered_twice_counts_once_and_is_not_a_replay(tmp_path):
    """Serve may deliver a call again when the ledger replica died after its commit; a second /feedback
    call for the same (request, item) is a replay."""
    store = _store(tmp_path)
    claim = _claim("r1", "u1", "marn", "i1", True)
    assert store.claim_feedback([claim]) == ["accepted"]
    assert store.claim_feedback([claim, claim]) == ["accepted", "accepted"]  # the same claim again
    assert store.claim_feedback([_claim("r1", "u1", "marn", "i1", True)]) == ["replayed"]  # a new call
    summary = store.summary()
    assert (summary["arms"]["marn"]["feedback"], summary["arms"]["marn"]["clicks"]) == (1, 1)
    assert summary["rejected_feedback"] == {"replayed": 1}
    store.close()


def test_a_ledger_from_before_claim_ids_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE seen (request_key TEXT NOT NULL, item_id TEXT NOT NULL, issued_at REAL NOT NULL, "
        "PRIMARY KEY (request_key, item_id)) WITHOUT ROWID"
    )
    old.execute("INSERT INTO seen VALUES ('r0', 'i0', 1e12)")
    old.commit()
    old.close()
    store = SQLiteLedgerStore(path, ARMS, replay_window_s=3600)
    assert store.claim_feedback([_claim("r0", "u1", "marn", "i0", True)]) == ["replayed"]  # kept its rows
    assert store.claim_feedback([_claim("r1", "u1", "marn", "i0", True)]) == ["accepted"]
    store.close()


def test_two_ledgers_on_one_file_count_every_event_once(tmp_path):
    """During a RayService upgrade the old and the new cluster's ledgers share the SQLite file (on one node:
    kustomize/base/rayservice.yaml): their flushes and claims interleave, and SQLite's locks keep the counts
    exact, the replay set and the assignment salt shared."""
    old, new = _store(tmp_path), _store(tmp_path)
    assert old.assignment_salt() == new.assignment_salt()
    weights = ("weights", {"marn": 0.5, "dupn": 0.5}, 1.0)
    assert old.apply(Batch("b0", [weights]))
    for k in range(20):
        store = (old, new)[k % 2]
        assert store.apply(Batch(f"b{k + 1}", [_request(f"u{k}", ARMS[k % 2])]))
        assert store.claim_feedback([_claim(f"r{k}", f"u{k}", ARMS[k % 2], "i1", k % 3 == 0)]) == ["accepted"]
    assert not new.apply(Batch("b3", [_request("u2", "marn")]))  # a flush the other ledger applied: once
    assert new.claim_feedback([_claim("r4", "u4", "marn", "i1", True)]) == ["replayed"]  # old counted it
    for store in (old, new):
        summary = store.summary()
        assert sum(a["requests"] for a in summary["arms"].values()) == 20
        assert sum(a["feedback"] for a in summary["arms"].values()) == 20
        assert sum(a["clicks"] for a in summary["arms"].values()) == 7  # k = 0, 3, ..., 18
    old.close()
    new.close()


def _scanned_sums(path, scope: str, arm: str) -> tuple[int, int, int, int]:
    """The cluster sums from every user's row, as the ledger computed them before it kept them."""
    row = (
        sqlite3.connect(path)
        .execute(
            "SELECT COUNT(*), TOTAL(clicks * clicks), TOTAL(feedback * feedback), TOTAL(clicks * feedback) "
            "FROM user_feedback WHERE scope = ? AND arm = ?",
            (scope, arm),
        )
        .fetchone()
    )
    return tuple(int(v) for v in row)


def _kept_sums(summary: dict, arm: str, scope: str) -> tuple[int, int, int, int]:
    view = summary["arms"][arm] if scope == "total" else summary["arms"][arm]["since_weight_change"]
    c = view["clusters"]
    return (c["users"], c["clicks_sq"], c["feedback_sq"], c["clicks_x_feedback"])


def test_the_kept_cluster_sums_equal_a_scan_of_every_users_row(tmp_path):
    store, rng = _store(tmp_path), random.Random(5)
    for k in range(300):
        if k in (100, 200):  # weight changes: the step's rows and sums start again
            store.apply(Batch(f"w{k}", [("weights", {"marn": k / 1000, "dupn": 1 - k / 1000}, float(k))]))
        user, arm = f"u{rng.randrange(12)}", rng.choice(ARMS)
        store.claim_feedback([_claim(f"r{k}", user, arm, "i1", rng.random() < 0.3)])
        if k % 37 == 0:
            summary = store.summary()
            for a in ARMS:
                for scope in ("total", "step"):
                    assert _kept_sums(summary, a, scope) == _scanned_sums(
                        tmp_path / "ledger.sqlite", scope, a
                    )
    assert _kept_sums(store.summary(), "marn", "total")[0] == 12  # every user seen on marn over 300 claims


def test_a_ledger_from_before_the_kept_sums_gets_them_from_its_rows_once(tmp_path):
    path = tmp_path / "ledger.sqlite"
    store = _store(tmp_path)
    for k, (user, clicked) in enumerate([("u1", True), ("u1", False), ("u2", True), ("u3", False)]):
        store.claim_feedback([_claim(f"r{k}", user, "marn", "i1", clicked)])
    before = store.summary()
    store.close()
    old = sqlite3.connect(path)  # as a ledger written before the table existed
    old.execute("DROP TABLE cluster_sums")
    old.execute("DELETE FROM meta WHERE key = 'cluster_sums'")
    old.commit()
    old.close()
    reopened = _store(tmp_path)
    assert reopened.summary() == before
    assert _kept_sums(before, "marn", "total") == (3, 2, 6, 3)  # u1: 1 click of 2, u2: 1 of 1, u3: 0 of 1
    reopened.claim_feedback([_claim("r9", "u2", "marn", "i1", True)])
    assert _kept_sums(reopened.summary(), "marn", "total") == _scanned_sums(path, "total", "marn")
