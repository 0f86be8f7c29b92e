"""A MARN registered while the service answers: every answer is the offline model of the version it names.

Real pieces: synthetic data materialized into Feast (sqlite), two MARNs trained one epoch each, the
pipeline's register stage (marn.stages.register_stage), and the serving scorer class (serve.scoring
ArmScorer, what each Ray Serve scorer replica runs) with no item cache, so every request reads its item
representations from Feast again. Ray Serve itself adds nothing here: a replica is an ArmScorer of the
champion at its start, answering with that version's name, as serve.app.Scorer does.

The "service" answers a fixed set of requests in a loop, on a thread, while the main thread registers
v0002 and then v0003. Like Serve, it keeps the replicas it started (old versions keep answering) and starts
one for each new champion as soon as the champion flips, which fails if that version's representations are
not in Feast yet. Registering v0003 deletes v0001's view while a v0001 replica still answers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from marn.config import Config
from marn.data.schema import read_dataset
from marn.data.synth import synthesize
from marn.features.materialize import materialize_features
from marn.features.repo import MARN_SERVICE, open_store
from marn.features.tables import representation_tables, representations_view
from marn.registry import GateDecision, champion
from marn.stages import register_stage, registry_dir, work_path
from marn.train import load_trained, train_model

pytestmark = pytest.mark.slow

NOW_US = 1_900_000_000 * 10**6  # a fixed "now" after every synthetic event: the same inputs every time
MAX_ANSWERS = 3000  # the service loop's bounds
MAX_SERVICE_S = 240.0


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_settings):
    root = tmp_path_factory.mktemp("versions")
    settings = tiny_settings(root / "work")
    settings["serve"]["item_cache_s"] = 0.0  # every request reads Feast: a mixed version would show at once
    cfg = Config.model_validate(settings)
    synthesize(root / "data", cfg.synth)
    materialize_features(root / "data", cfg)
    runs = []
    for seed in (1, 2):  # two MARNs with different weights
        trained = Config.model_validate(
            {**settings, "train": {**settings["train"], "model": "marn", "seed": seed}}
        )
        runs.append(root / "runs" / f"marn-{seed}")
        train_model(read_dataset(root / "data"), trained, runs[-1], show_progress=False)
    return {"cfg": cfg, "data": root / "data", "runs": runs, "dataset": read_dataset(root / "data")}


def _register(world, run: Path) -> dict:
    evaluation = {"gate": asdict(GateDecision(True, 0.5, "test: every candidate passes"))}
    return register_stage(run, world["data"], evaluation, world["cfg"])


def _replica(cfg):
    """What a Serve scorer replica does at start: load the champion, read its version's representations."""
    from serve.features import FeatureFetcher
    from serve.scoring import ArmScorer

    current = champion(registry_dir(cfg), "marn")
    fetcher = FeatureFetcher(work_path(cfg, cfg.feast.repo_dir, "feast"), cfg.serve.item_cache_s)
    scorer = ArmScorer(current.checkpoint, fetcher, cfg.samples.max_history)
    assert scorer.uses_representations and scorer.version == current.version
    return scorer


def _offline(cfg, version: str, scorer, requests) -> np.ndarray:
    """The version's own model, loaded afresh from the registry, computing every item representation from
    its weights (the training forward) on the same inputs as the service."""
    model = load_trained(registry_dir(cfg) / "marn" / version / "model.pt").model
    histories = scorer.histories(requests, NOW_US)
    codes = scorer.item_codes(
        [i for r, h in zip(requests, histories, strict=True) for i in (*r.candidates, *h.items)]
    )
    batch = scorer.expanded_batch(requests, histories, codes, scorer.item_stats(list(codes)), NOW_US)
    with torch.no_grad():
        return torch.sigmoid(model(batch).logits).numpy()


class Service(threading.Thread):
    """Answers the requests round robin from every replica started so far; starts a replica for each new
    champion. Records (version, request index, scores); bounded in answers and seconds."""

    def __init__(self, cfg, requests):
        super().__init__(daemon=True)
        self.cfg, self.requests = cfg, requests
        self.replicas = {}
        first = _replica(cfg)
        self.replicas[first.version] = first
        self.answers: list[tuple[str, int, list[float]]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + MAX_SERVICE_S
        try:
            k = 0
            while not self.stop.is_set() and len(self.answers) < MAX_ANSWERS and time.monotonic() < deadline:
                if champion(registry_dir(self.cfg), "marn").version not in self.replicas:
                    scorer = _replica(self.cfg)  # the champion flipped: its representations must be there
                    self.replicas[scorer.version] = scorer
                for version, scorer in list(self.replicas.items()):
                    [scores] = scorer.score([self.requests[k % len(self.requests)]], NOW_US)
                    self.answers.append((version, k % len(self.requests), scores))
                k += 1
        except BaseException as err:  # reported by the test
            self.error = err

    def answered(self, version: str) -> int:
        return sum(v == version for v, _, _ in self.answers)

    def wait_for(self, version: str, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.answered(version) < count and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.05)
        assert self.error is None, f"the service failed: {self.error!r}"
        assert self.answered(version) >= count, f"{version}: {self.answered(version)} answers, wanted {count}"


def test_registering_while_serving_never_mixes_versions(world):
    from serve.scoring import ScoreRequest

    cfg = world["cfg"]
    repo = work_path(cfg, cfg.feast.repo_dir, "feast")
    assert _register(world, world["runs"][0])["version"] == "v0001"

    users = sorted(world["dataset"].events["user_id"].astype(str).unique())[:3]
    items = sorted(world["dataset"].items["item_id"].astype(str).unique())[:12]
    requests = [ScoreRequest(u, items) for u in [*users, "a-new-user"]]
    service = Service(cfg, requests)
    offline = {"v0001": _offline(cfg, "v0001", service.replicas["v0001"], requests)}
    service.start()
    try:
        service.wait_for("v0001", 20)
        second = _register(world, world["runs"][1])  # while v0001 answers
        assert second["version"] == "v0002" and second["deleted_representations"] == []
        service.wait_for("v0002", 20)
        before = service.answered("v0001")
        service.wait_for("v0001", before + 20)  # the old replica answers on, from its own view

        third = _register(world, world["runs"][1])  # v0003: same weights as v0002; v0001's view goes
        assert third["deleted_representations"] == [representations_view("marn", "v0001")]
        service.wait_for("v0003", 10)
        before = service.answered("v0001")
        service.wait_for("v0001", before + 20)  # its view deleted: it computes them from its own weights
    finally:
        service.stop.set()
        service.join(timeout=60)
    assert service.error is None, f"the service failed: {service.error!r}"

    for version in ("v0002", "v0003"):
        offline[version] = _offline(cfg, version, service.replicas[version], requests)
    assert np.abs(offline["v0001"] - offline["v0002"]).max() > 1e-3  # the versions do score differently
    width = len(items)
    worst = {}
    for version, k, scores in service.answers:
        expected = offline[version][k * width : (k + 1) * width]
        worst[version] = max(worst.get(version, 0.0), float(np.abs(np.asarray(scores) - expected).max()))
    assert set(worst) == {"v0001", "v0002", "v0003"}
    assert max(worst.values()) < 1e-5, worst

    # Feast keeps the served versions only: the new champion's and the one it replaced.
    kept = [representations_view("marn", v) for v in ("v0002", "v0003")]
    store = open_store(repo)
    assert sorted(v.name for v in store.list_feature_views() if v.name.startswith("item_repr")) == kept
    assert sorted(representation_tables(repo / "data")) == kept
    assert {p.name for p in store.get_feature_service(MARN_SERVICE).feature_view_projections} >= set(kept)
