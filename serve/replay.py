"""An offline A/B simulation against the running service, through the documented HTTP contract only.

Each replayed user's last event is held out as the "next item". The user's earlier items go in the
request's ``history``; the candidates are that next item plus items sampled from the catalogue. The top K
by score are "shown": feedback says clicked for the next item and not clicked for the rest, so an arm's
CTR is clicks / items shown and its recall@K the share of its users whose next item was shown.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from marn.data.schema import read_dataset
from serve.ab import ctr_test

CLIENTS = 4  # concurrent replay clients
TIMEOUT_S = 30


def replay_cases(
    data_dir: Path, users: int, candidates: int, max_history: int, seed: int
) -> list[dict[str, Any]]:
    """One case per sampled user with at least 2 events: user_id, history, next item, candidates."""
    if candidates < 2:
        raise ValueError(f"candidates must be at least 2 (the next item and one other), got {candidates}")
    dataset = read_dataset(data_dir)
    events = dataset.events.sort_values(["user_id", "ts"], kind="stable")
    catalogue = dataset.items["item_id"].astype(str).unique()
    rng = np.random.default_rng(seed)
    sequences = events.groupby("user_id", sort=True)["item_id"].agg(list)
    sequences = sequences[sequences.map(len) >= 2]
    if sequences.empty:
        raise ValueError(f"{data_dir}: no user with at least 2 events to replay")
    chosen = rng.choice(len(sequences), size=min(users, len(sequences)), replace=False)
    cases = []
    for index in sorted(chosen):
        user, items = sequences.index[index], [str(i) for i in sequences.iloc[index]]
        target, history = items[-1], items[:-1][-max_history:]
        pool = np.setdiff1d(catalogue, [target, *history])
        others = rng.choice(pool, size=min(candidates - 1, len(pool)), replace=False).tolist()
        shown = [target, *others]
        rng.shuffle(shown)
        cases.append({"user_id": str(user), "history": history, "target": target, "candidates": shown})
    return cases


def replay(
    url: str,
    key: str,
    data_dir: Path,
    users: int = 500,
    candidates: int = 100,
    k: int = 10,
    seed: int = 7,
    max_history: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Play the cases against ``url`` with the client ``key``; per-arm users, shown, clicks, CTR, recall@K
    and errors."""
    cases = replay_cases(data_dir, users, candidates, max_history, seed)
    local = threading.local()
    done = [0]
    lock = threading.Lock()

    def play(case: dict[str, Any]) -> dict[str, Any]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.headers["Authorization"] = f"Bearer {key}"
        body = {"user_id": case["user_id"], "candidates": case["candidates"], "history": case["history"]}
        outcome: dict[str, Any] = {"arm": None, "hit": False, "shown": 0, "failed": 0}
        try:
            response = session.post(f"{url}/predict", json=body, timeout=TIMEOUT_S)
            response.raise_for_status()
            answer = response.json()
            top = np.argsort(-np.asarray(answer["scores"]), kind="stable")[:k]
            shown = [case["candidates"][i] for i in top]
            outcome.update(arm=answer["arm"], hit=case["target"] in shown, shown=len(shown))
            for item in shown:  # each click names the response it is about (its signed request_id)
                feedback = {
                    "user_id": case["user_id"],
                    "item_id": item,
                    "clicked": item == case["target"],
                    "request_id": answer["request_id"],
                }
                session.post(f"{url}/feedback", json=feedback, timeout=TIMEOUT_S).raise_for_status()
        except (requests.RequestException, KeyError, ValueError):
            outcome["failed"] = 1
        with lock:
            done[0] += 1
            if progress:
                progress(done[0], len(cases))
        return outcome

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(play, cases))

    arms: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        if o["arm"] is None:
            continue
        a = arms.setdefault(o["arm"], {"users": 0, "shown": 0, "clicks": 0})
        a["users"] += 1
        a["shown"] += o["shown"]
        a["clicks"] += int(o["hit"])
    for a in arms.values():
        a["ctr"] = a["clicks"] / a["shown"] if a["shown"] else 0.0
        a["recall"] = a["clicks"] / a["users"] if a["users"] else 0.0
    names = sorted(arms)
    test = {"a": None, "b": None, "z": None, "p_two_sided": None}
    if len(names) == 2:
        a, b = (arms[n] for n in names)
        test = {"a": names[0], "b": names[1], **ctr_test(a["clicks"], a["shown"], b["clicks"], b["shown"])}
    return {"arms": arms, "failed": sum(o["failed"] for o in outcomes), "cases": len(cases), "ctr_test": test}
