"""The serving path under load and failure, without Ray or a model: the scorers' item cache when full, a
failing request inside a micro-batch, the ledger's view of a fallback, one flush in flight, a hung scorer
and histories longer than the model reads (docs/design.md's HTTP contract; the review of serve/)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_serve_fuzz import InProcessService, id_scorer, make_callers

import serve.app
import serve.features
from marn.config import ServeConfig
from marn.features.tables import ITEM_STATS, USER_SEQUENCES
from serve.ab import ABLedger, PredictBody, assign_arm
from serve.app import RouterCore
from serve.features import FeatureFetcher, UserHistory
from serve.ledger_store import Batch
from serve.scoring import ArmScorer, ScoreRequest, ScoringError

WEIGHTS = {"marn": 0.5, "dupn": 0.5}

# -- the item cache ------------------------------------------------------------------------------------------


class FakeStore:
    """Feast's online store, as FeatureFetcher uses it: one item_stats feature, for the ``known`` items."""

    def __init__(self, known: set[str]):
        self.known, self.reads = known, []

    def list_feature_views(self, allow_cache: bool = True) -> list[SimpleNamespace]:
        features = [SimpleNamespace(name="n_click")]
        return [
            SimpleNamespace(name=ITEM_STATS, features=features),
            SimpleNamespace(name=USER_SEQUENCES, features=[]),
        ]

    def get_online_features(self, features: list[str], entity_rows: list[dict[str, str]]) -> SimpleNamespace:
        ids = [row["item_id"] for row in entity_rows]
        self.reads.extend(ids)
        rows = {"item_id": ids, "n_click": [7.0 if i in self.known else None for i in ids]}
        return SimpleNamespace(to_dict=lambda: rows)


def _fetcher(monkeypatch, tmp_path, known: set[str], **caps: int) -> tuple[FeatureFetcher, FakeStore]:
    store = FakeStore(known)
    (tmp_path / "feature_store.yaml").write_text("project: test\n")
    monkeypatch.setattr(serve.features, "open_store", lambda repo_dir: store)
    return FeatureFetcher(tmp_path, item_cache_s=60.0, **caps), store


def test_a_full_item_cache_still_answers_every_id_asked(monkeypatch, tmp_path):
    known = {"popular", "new-item"} | {f"k{i}" for i in range(100)}
    fetcher, _ = _fetcher(monkeypatch, tmp_path, known, max_cached_items=20)
    fetcher.items(["popular"])
    fetcher.items([f"k{i}" for i in range(19)])  # the cache now holds 20 fresh rows
    rows = fetcher.items(["popular", "new-item"])  # one cached, one not: both answered
    assert rows == {"popular": {"n_click": 7.0}, "new-item": {"n_click": 7.0}}
    many = [f"k{i}" for i in range(100)]  # more ids than the cache holds, in one request
    assert list(fetcher.items(many)) == many
    assert len(fetcher._items) == 20


def test_the_item_cache_evicts_the_oldest_reads_and_bounds_unknown_ids_apart(monkeypatch, tmp_path):
    known = {f"k{i}" for i in range(30)}
    fetcher, store = _fetcher(monkeypatch, tmp_path, known, max_cached_items=20, max_cached_unknown=5)
    fetcher.items([f"k{i}" for i in range(20)])
    fetcher.items(["k20"])  # one past the cap: only the oldest read goes
    store.reads.clear()
    fetcher.items(["k0", "k1", "k20"])
    assert store.reads == ["k0"]
    junk = [f"junk-{i}" for i in range(1000)]  # made-up ids, as any client may send
    assert fetcher.items(junk)["junk-999"] == {"n_click": None}
    assert len(fetcher._unknown) == 5 and len(fetcher._items) == 20
    store.reads.clear()
    fetcher.items(["k0", "k20", "junk-999"])  # the catalogue's rows survived them; unknowns are cached too
    assert store.reads == []


# -- a failing request in a micro-batch ----------------------------------------------------------------------


def test_a_request_that_fails_gets_its_own_error_and_its_batch_mates_their_scores():
    scorer = object.__new__(ArmScorer)  # no checkpoint: only score_each's handling is tested
    scorer.name, batches = "marn", []

    def score(requests: list[ScoreRequest], now_us: int) -> list[list[float]]:
        batches.append([r.user_id for r in requests])
        if any(r.user_id == "hostile" for r in requests):
            raise KeyError("no such row")
        return [[0.5] * len(r.candidates) for r in requests]

    scorer.score = score
    requests = [ScoreRequest(u, ["a", "b"]) for u in ("u1", "hostile", "u2")]
    results = scorer.score_each(requests, now_us=0)
    assert results[0] == results[2] == [0.5, 0.5]
    assert isinstance(results[1], ScoringError) and "KeyError" in str(results[1])
    assert batches == [["u1", "hostile", "u2"], ["u1"], ["hostile"], ["u2"]]  # together first, then alone
    assert scorer.score_each(requests[:1], now_us=0) == [[0.5, 0.5]]


# -- the ledger's view of a fallback -------------------------------------------------------------------------


SALT = "5a" * 32  # SlowLedger's assignment salt


def _users(arm: str, n: int, salt: str = SALT) -> list[str]:
    """Users the router assigns to ``arm`` (it reads the salt from its ledger)."""
    key = bytes.fromhex(salt)
    return [u for u in (f"user-{k}" for k in range(10 * n)) if assign_arm(u, WEIGHTS, key) == arm][:n]


def test_a_fallback_counts_an_error_for_the_dead_arm_and_a_request_for_the_arm_that_answered(tmp_path):
    async def marn_down(arm: str, work: ScoreRequest) -> dict[str, Any]:
        if arm == "marn":
            raise RuntimeError("the marn scorer replica died")
        return await id_scorer(arm, work)

    service = InProcessService(tmp_path)
    try:
        service.core.score = marn_down
        tokens = []
        salt = service.store.assignment_salt()
        for user in _users("marn", 5, salt) + _users("dupn", 3, salt):
            body = {"user_id": user, "candidates": ["a", "b"]}
            answer = service.post("/predict", json.dumps(body).encode()).json()
            assert answer["arm"] == "dupn"
            tokens.append((user, answer["request_id"]))
        user, token = tokens[0]  # a fallback answer: its feedback is dupn's
        click = {"user_id": user, "item_id": "a", "clicked": True, "request_id": token}
        assert service.post("/feedback", json.dumps(click).encode()).json()["arm"] == "dupn"
        arms = service.post_get("/ab")["arms"]
    finally:
        service.close()
    marn, dupn = arms["marn"], arms["dupn"]
    assert (marn["requests"], marn["errors"], marn["latency_ms"]["p50"]) == (5, 5, None)
    assert (dupn["requests"], dupn["errors"]) == (8, 0) and dupn["latency_ms"]["p50"] is not None
    assert marn["since_weight_change"]["errors"] == 5
    answered = sum(a["requests"] - a["errors"] for a in arms.values())
    assert answered == 8  # every answer counted once, on the arm that gave it
    assert (marn["feedback"], dupn["feedback"], dupn["clicks"]) == (0, 1, 1)


# -- one flush in flight -------------------------------------------------------------------------------------


class SlowLedger:
    """A ledger whose record takes a while and fails its first call (a restart), as the router sees it."""

    def __init__(self) -> None:
        self.in_flight = self.most_in_flight = 0
        self.sent: list[str] = []
        self.counted: dict[str, list[tuple]] = {}

    async def record(self, batch: Batch) -> bool:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.sent.append(batch.batch_id)
        try:
            await asyncio.sleep(0.02)
            if len(self.sent) == 1:
                raise ConnectionError("the ledger is restarting")
            fresh = batch.batch_id not in self.counted
            self.counted.setdefault(batch.batch_id, list(batch.events))
            return fresh
        finally:
            self.in_flight -= 1

    async def feedback(self, claim: Any) -> str:
        return "accepted"

    async def assignment_salt(self) -> str:
        return SALT

    async def summary(self) -> dict[str, Any]:
        return {
            **ABLedger(["marn", "dupn"]).summary(),
            "rejected_feedback": {},
            "events_folded": 0,
            "events_pruned": 0,
        }


def test_a_burst_of_events_gets_one_flush_in_flight_and_every_event_counted_once():
    async def burst() -> tuple[SlowLedger, RouterCore]:
        ledger = SlowLedger()
        core = RouterCore(["marn", "dupn"], id_scorer, ledger, ServeConfig(), b"k" * 32, make_callers()[0])
        core.reconfigure({"weights": WEIGHTS})
        for wave in range(3):
            bodies = [PredictBody(user_id=f"u{wave}-{i}", candidates=["a"]) for i in range(400)]
            await asyncio.gather(*(core.predict(body) for body in bodies))
            await asyncio.sleep(0.01)
        await asyncio.sleep(serve.app.FLUSH_EVERY_S)  # past the failed flush's pause
        await core._flush()
        core.flusher.cancel()
        return ledger, core

    ledger, core = asyncio.run(burst())
    assert ledger.most_in_flight == 1
    assert len(core.buffer) == 0
    events = [e for batch in ledger.counted.values() for e in batch]
    assert len(events) == 1 + 3 * 400  # the weights and every request, each in exactly one counted batch
    assert len({(e[1], e[0]) for e in events if e[0] == "request"}) == 1200
    resent = [b for b in ledger.sent if ledger.sent.count(b) > 1]
    assert set(resent) == {ledger.sent[0]}  # only the batch whose send failed went again


class CountingSummaries(SlowLedger):
    """A ledger whose summary takes a while and counts how often it is read."""

    def __init__(self) -> None:
        super().__init__()
        self.summaries = 0

    async def summary(self) -> dict[str, Any]:
        self.summaries += 1
        await asyncio.sleep(0.05)
        return await super().summary()


def test_a_flood_of_ab_reads_costs_one_ledger_summary_at_a_time():
    async def flood() -> tuple[CountingSummaries, list[Any], list[Any]]:
        ledger = CountingSummaries()
        core = RouterCore(["marn", "dupn"], id_scorer, ledger, ServeConfig(), b"k" * 32, make_callers()[0])
        core.reconfigure({"weights": WEIGHTS})
        together = await asyncio.gather(*(core.ab() for _ in range(200)))
        impatient = asyncio.ensure_future(core.ab())  # a caller that goes away mid-read
        await asyncio.sleep(0.01)
        impatient.cancel()
        later = [await core.ab(), await core.ab()]  # one after another: each reads afresh
        if core.flusher:
            core.flusher.cancel()
        return ledger, together, later

    ledger, together, later = asyncio.run(flood())
    # the 200 at once shared one read; the cancelled caller's read went on and answered the next caller
    assert ledger.summaries == 1 + 2
    assert all(s == together[0] for s in together) and together[0].arms["marn"].requests == 0
    assert all(s.canary is not None for s in later)


# -- a hung scorer -------------------------------------------------------------------------------------------


def test_a_hung_scorer_is_given_up_on_and_the_other_arm_answers(monkeypatch):
    monkeypatch.setattr(serve.app, "SCORE_TIMEOUT_S", 0.05)

    async def run(hung: set[str]) -> tuple[Any, list[tuple]]:
        async def score(arm: str, work: ScoreRequest) -> dict[str, Any]:
            if arm in hung:
                await asyncio.Event().wait()  # a Feast read that never returns
            return await id_scorer(arm, work)

        core = RouterCore(["marn", "dupn"], score, SlowLedger(), ServeConfig(), b"k" * 32, make_callers()[0])
        core.reconfigure({"weights": WEIGHTS})
        answer = await asyncio.wait_for(
            core.predict(PredictBody(user_id=_users("marn", 1)[0], candidates=["a"])), 5
        )
        core.flusher.cancel()
        return answer, core.buffer._fresh.events

    answer, events = asyncio.run(run({"marn"}))
    assert answer.arm == "dupn"
    assert [(e[2], e[4]) for e in events if e[0] == "request"] == [("marn", False), ("dupn", True)]
    answer, _ = asyncio.run(run({"marn", "dupn"}))
    assert answer.status_code == 503


# -- histories longer than the model reads -------------------------------------------------------------------


class FakeHistories:
    def __init__(self, history: UserHistory):
        self.history = history

    def histories(self, user_ids: list[str]) -> list[UserHistory]:
        return [self.history for _ in user_ids]


def test_only_the_newest_max_history_items_are_looked_up():
    scorer = object.__new__(ArmScorer)  # no checkpoint: only the history handling is tested
    scorer.max_history = 3
    items = [f"i{k}" for k in range(10)]
    times = [1_000 * k for k in range(10)]
    scorer.fetcher = FakeHistories(UserHistory(items, ["click"] * 10, times))
    given, read = scorer.histories(
        [ScoreRequest("u1", ["c"], history=items), ScoreRequest("u2", ["c"])], now_us=8_500
    )
    assert given.items == ["i7", "i8", "i9"] and given.behaviors == ["click"] * 3
    assert read == UserHistory(["i6", "i7", "i8"], ["click"] * 3, [6_000, 7_000, 8_000])  # before now


def test_an_empty_history_is_a_valid_request_for_a_new_user():
    body = PredictBody.model_validate({"user_id": "new", "candidates": ["a"], "history": []})
    assert body.history == []


# -- a weight change and the feedback right after it -------------------------------------------------------


def test_feedback_right_after_a_weight_change_counts_in_the_new_step(tmp_path):
    """Review finding 13: a click claimed after ``reconfigure`` but before the router's next flush was
    counted in the old step, then erased with it when the flush brought the weight change."""
    service = InProcessService(tmp_path)
    try:
        body = {"user_id": "u1", "candidates": ["a", "b"]}
        answer = service.post("/predict", json.dumps(body).encode()).json()
        service.post_get("/ab")  # flushed: the ledger has the starting weights and the request
        service.core.reconfigure({"weights": {"marn": 0.25, "dupn": 0.75}})
        click = {"user_id": "u1", "item_id": "a", "clicked": True, "request_id": answer["request_id"]}
        assert service.post("/feedback", json.dumps(click).encode()).status_code == 202
        arm = service.post_get("/ab")["arms"][answer["arm"]]
    finally:
        service.close()
    assert (arm["feedback"], arm["clicks"]) == (1, 1)
    assert (arm["since_weight_change"]["feedback"], arm["since_weight_change"]["clicks"]) == (1, 1)


# -- cold-item slots -----------------------------------------------------------------------------------------


def _cold_scorer(max_cold_items: int) -> ArmScorer:
    """An ArmScorer without a checkpoint: two trained items, modality tables of width 2, a Feast that knows
    every ``n*`` item (category c1, an image vector from its number)."""
    from collections import OrderedDict

    from torch import nn

    from marn.data.tensors import Vocab
    from marn.models.layers import ItemModalities

    embedding = ItemModalities.__new__(ItemModalities)
    nn.Module.__init__(embedding)
    embedding.register_buffer("attributes", torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 0]]))  # PAD, a, b
    embedding.register_buffer("image", torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    embedding.register_buffer("title", torch.ones(3, 4, dtype=torch.long))
    embedding.id_tables = nn.ModuleList([nn.Embedding(3, 2)])

    def items(ids: list[str]) -> dict[str, dict[str, Any]]:
        return {
            i: {"category_id": "c1", "image_embedding": [float(i[1:]), -float(i[1:])]}
            if i.startswith("n")
            else {}
            for i in ids
        }

    scorer = object.__new__(ArmScorer)
    scorer.name, scorer.max_cold_items, scorer.image_encoder = "marn", max_cold_items, None
    scorer.model = SimpleNamespace(embedding=embedding)
    scorer.catalog = SimpleNamespace(
        items=Vocab(("a", "b")), categories=Vocab(("c1",)), brands=Vocab(()), shops=Vocab(())
    )
    scorer.fetcher = SimpleNamespace(items=items)
    scorer._cold, scorer.cold_reused, scorer.cold_images = OrderedDict(), 0, True
    return scorer


def test_cold_slots_go_to_new_items_by_least_recent_use_and_never_to_a_trained_item():
    """Review finding 11: once every slot was taken, each later new item was scored as padding."""
    scorer = _cold_scorer(max_cold_items=3)
    assert scorer.item_codes(["a", "n1", "n2", "unheard-of"]) == {
        "a": 1, "n1": 3, "n2": 4, "unheard-of": 0  # Feast knows nothing of it: padding, no slot
    }  # fmt: skip
    assert scorer.item_codes(["n3"]) == {"n3": 5}  # the last free slot
    assert scorer.item_codes(["n2", "n4"]) == {"n2": 4, "n4": 3}  # n1, least recently used, gives its slot
    assert scorer.item_codes(["n1"]) == {"n1": 5}  # back, in n3's slot (n2 and n4 were used since)
    assert scorer.cold_reused == 2 and list(scorer._cold) == ["n2", "n4", "n1"]
    image = scorer.model.embedding.image
    assert image[:3].tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]  # the trained rows, untouched
    assert image[3].tolist() == [4.0, -4.0] and image[5].tolist() == [1.0, -1.0] and len(image) == 6
    assert scorer.model.embedding.title[3:].sum() == 0  # a cold item has no title
    many = [f"n{k}" for k in range(10, 16)]  # more new items in one call than there are slots
    codes = scorer.item_codes(many)
    assert sorted(c for c in codes.values() if c) == [3, 4, 5] and list(codes.values()).count(0) == 3
    with pytest.raises(ValueError, match="only rows added by extend"):
        scorer.model.embedding.overwrite(
            torch.tensor([2]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2)
        )


def test_cold_items_get_no_image_when_feasts_vectors_are_not_the_ones_the_model_was_trained_on():
    """COURIER review #6: Feast re-embedded with another backbone would put cold items in another space."""
    scorer = _cold_scorer(max_cold_items=3)
    trained = {"a": [1.0, 1.0], "b": [2.0, 2.0]}  # the image table's rows of a and b
    known = scorer.fetcher.items

    def feast(vectors: dict[str, list[float] | None]):
        return lambda ids: {
            i: {"image_embedding": vectors.get(i)} if i in vectors else known([i])[i] for i in ids
        }

    scorer.fetcher = SimpleNamespace(items=feast(trained))
    assert scorer._image_vectors_match()
    scorer.fetcher = SimpleNamespace(items=feast({"a": None, "b": None}))
    assert scorer._image_vectors_match()  # nothing to compare: no posters
    scorer.fetcher = SimpleNamespace(items=feast({"a": [0.5, -3.0], "b": [2.0, 2.0]}))  # another backbone
    assert not scorer._image_vectors_match()
    scorer.cold_images = False
    codes = scorer.item_codes(["n7"])
    assert scorer.model.embedding.image[codes["n7"]].tolist() == [0.0, 0.0]  # no image, as without a poster
    assert scorer.model.embedding.attributes[codes["n7"]].tolist() == [1, 0, 0]  # its category still counts
