"""The model registry and its evaluation gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marn.registry import champion, data_snapshot, gate, register_model, registered_version, versions


def _run(tmp_path: Path, name: str, auc: float, model: str = "marn") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "model.pt").write_bytes(b"weights " + name.encode())
    (run / "metrics.json").write_text(
        json.dumps({"model": model, "auc": auc, "user_auc": auc, "logloss": 0.6})
    )
    return run


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "events.parquet").write_bytes(b"events v1")
    (data / "items.parquet").write_bytes(b"items v1")
    return data


def test_first_model_passes_the_gate_and_becomes_champion(tmp_path, data_dir):
    registry = tmp_path / "registry"
    decision = gate({"auc": 0.61}, champion(registry, "marn"), min_improvement=0.0)
    assert decision.passed and decision.champion_version is None
    registered = register_model(registry, _run(tmp_path, "r1", 0.61), data_dir, decision)
    assert registered.version == "v0001"
    assert champion(registry, "marn") == registered
    assert registered.checkpoint.read_bytes() == b"weights r1"
    card = registered.card
    assert card["metrics"]["auc"] == 0.61 and card["gate"]["passed"] is True
    assert set(card["data"]["tables"]) == {"events", "items"}


def test_gate_refuses_a_model_that_does_not_beat_the_champion(tmp_path, data_dir):
    registry = tmp_path / "registry"
    first = gate({"auc": 0.70}, None, 0.0)
    register_model(registry, _run(tmp_path, "r1", 0.70), data_dir, first)
    rescored = {"auc": 0.70}  # the champion scored again on the candidate's test split
    worse = gate({"auc": 0.69}, champion(registry, "marn"), 0.0, rescored)
    tie = gate({"auc": 0.70}, champion(registry, "marn"), 0.0, rescored)
    assert not worse.passed and not tie.passed
    assert "does not beat champion v0001" in worse.reason and "same test split" in worse.reason
    with pytest.raises(ValueError, match="refused"):
        register_model(registry, _run(tmp_path, "r2", 0.69), data_dir, worse)
    assert versions(registry, "marn") == ["v0001"]
    assert champion(registry, "marn").version == "v0001"


def test_min_improvement_and_version_numbers(tmp_path, data_dir):
    registry = tmp_path / "registry"
    register_model(registry, _run(tmp_path, "r1", 0.70), data_dir, gate({"auc": 0.70}, None, 0.01))
    small = gate({"auc": 0.705}, champion(registry, "marn"), 0.01, {"auc": 0.70})
    enough = gate({"auc": 0.711}, champion(registry, "marn"), 0.01, {"auc": 0.70})
    assert not small.passed and enough.passed
    second = register_model(registry, _run(tmp_path, "r2", 0.711), data_dir, enough)
    assert second.version == "v0002" and champion(registry, "marn").version == "v0002"
    assert versions(registry, "marn") == ["v0001", "v0002"]
    assert champion(registry, "dupn") is None  # champions are per model name


def test_data_snapshot_changes_with_the_data(data_dir):
    before = data_snapshot(data_dir)
    assert data_snapshot(data_dir) == before
    (data_dir / "events.parquet").write_bytes(b"events v2")
    after = data_snapshot(data_dir)
    assert after["version"] != before["version"]
    assert after["tables"]["items"] == before["tables"]["items"]


def test_the_gate_compares_with_the_champion_rescored_not_with_its_stored_auc(tmp_path, data_dir):
    registry = tmp_path / "registry"
    register_model(registry, _run(tmp_path, "r1", 0.90), data_dir, gate({"auc": 0.90}, None, 0.0))
    # stored 0.90 on its own (older) split; on the candidate's split the champion scores 0.60
    decision = gate({"auc": 0.65}, champion(registry, "marn"), 0.0, {"auc": 0.60})
    assert decision.passed and decision.champion_auc == 0.60


def test_the_gate_refuses_when_the_champion_cannot_be_rescored(tmp_path, data_dir):
    registry = tmp_path / "registry"
    register_model(registry, _run(tmp_path, "r1", 0.50), data_dir, gate({"auc": 0.50}, None, 0.0))
    decision = gate({"auc": 0.99}, champion(registry, "marn"), 0.0, None, "ValueError: an old checkpoint")
    assert not decision.passed
    assert "could not be scored" in decision.reason and "an old checkpoint" in decision.reason


def test_before_champion_runs_on_the_new_version_before_the_flip_and_a_failure_registers_nothing(
    tmp_path, data_dir
):
    registry = tmp_path / "registry"
    register_model(registry, _run(tmp_path, "r1", 0.70), data_dir, gate({"auc": 0.70}, None, 0.0))
    seen = {}

    def publish(staged):  # what registration's Feast publication sees: the new version, the old champion
        seen.update(
            version=staged.version,
            weights=staged.checkpoint.read_bytes(),
            champion=champion(registry, "marn").version,
        )
        return {"item_representations": 7}

    second = register_model(
        registry,
        _run(tmp_path, "r2", 0.75),
        data_dir,
        gate({"auc": 0.75}, None, 0.0),
        before_champion=publish,
    )
    assert seen == {"version": "v0002", "weights": b"weights r2", "champion": "v0001"}
    assert champion(registry, "marn") == second and second.card["item_representations"] == 7
    assert registered_version(second.checkpoint) == "v0002"

    def fail(staged):
        raise RuntimeError("Feast is down")

    with pytest.raises(RuntimeError, match="Feast is down"):
        register_model(
            registry, _run(tmp_path, "r3", 0.8), data_dir, gate({"auc": 0.8}, None, 0.0), before_champion=fail
        )
    assert champion(registry, "marn").version == "v0002" and versions(registry, "marn") == ["v0001", "v0002"]
    assert [p.name for p in (registry / "marn").iterdir() if p.name.startswith(".")] == []  # no staging left
    with pytest.raises(FileNotFoundError, match="not a registered model"):
        registered_version(tmp_path / "r1" / "model.pt")
