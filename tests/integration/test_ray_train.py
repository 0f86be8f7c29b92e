"""Ray Train on a real local Ray: two DDP workers, and a worker killed mid-run that the run survives.

One Ray serves the module (it costs seconds on 2 cores); each test still starts its own worker group.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import count_points  # tests/ is on sys.path: pytest imports conftest from there

from marn.config import Config, RayConfig, SynthConfig, load_config
from marn.curves import CURVE
from marn.data.schema import Dataset, read_dataset
from marn.data.synth import synthesize
from marn.distributed import train_distributed
from marn.ray_runtime import ray_session
from marn.train import load_trained, train_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_running():
    with pytest.MonkeyPatch.context() as env:
        # The Train controller collects one report per worker per poll (every 2 s by default): with epochs
        # of a fraction of a second, polling dominates the run. Read by the controller Ray starts below.
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        with ray_session(RayConfig()):
            yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("ray_train")
    synthesize(root / "data", SynthConfig(users=60, items=80, seed=3))
    return read_dataset(root / "data")


def _cfg(tmp_path: Path, epochs: int) -> Config:
    glove = tmp_path / "glove.txt"  # a tiny word-vector file: the 400k-word default is slow to load
    glove.write_text("red 0.1 0.2 0.3\nblue -0.1 0.0 0.2\n")
    return load_config(
        None,
        {
            # patience above the epochs: every epoch runs, so the history is predictable
            "train": {"model": "lr", "epochs": epochs, "batch_size": 128, "patience": epochs + 1},
            "features": {"image": "pixels", "image_pixels": 4, "word_vectors": str(glove)},
            "distributed": {"workers": 2, "cpus_per_worker": 1.0, "max_failures": 2},
        },
    )


def test_two_workers_write_what_train_model_writes(tmp_path, dataset, ray_running):
    cfg = _cfg(tmp_path, epochs=3)
    lines: list[str] = []
    result = train_distributed(dataset, cfg, tmp_path / "run", print_epoch=lines.append)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # One line per epoch on the driver, from the workers' reports, with rank 0's validation AUC
    assert [line.split("  ")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    for line, epoch in zip(lines, metrics["history"], strict=True):
        assert f"valid AUC {epoch['valid_auc']:.4f}" in line and "train loss 0." in line
    assert count_points(tmp_path / "run" / CURVE) == 2 * 3  # the curve beside metrics.json
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["workers"] == 2 and metrics["resumed_from_epochs"] == []
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["auc"] > 0.5 and 0 < metrics["logloss"] < 1.0
    # Same files and keys as one process; each worker saw half the batches, so results agree only loosely.
    single = train_model(dataset, cfg, tmp_path / "single", show_progress=False).metrics
    assert set(metrics) - set(single) == {"workers", "resumed_from_epochs", "ray_run"}
    assert metrics["samples"] == single["samples"] and abs(metrics["auc"] - single["auc"]) < 0.1
    trained = load_trained(result.checkpoint)
    model, config = trained.model, trained.config
    assert config["train"]["model"] == "lr" and not any(k.startswith("module.") for k in model.state_dict())


def test_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path, dataset, ray_running):
    marker = tmp_path / "killed"

    def kill_rank_1_once_in_epoch_2(epoch: int, rank: int) -> None:
        # Runs inside a Ray worker; the marker file makes the kill happen in the first attempt only.
        import ray.train

        if epoch == 2 and rank == 1 and not marker.exists():
            # The controller registers a report only once it has polled it from every rank; wait for that,
            # or epoch 1's report could die with this worker and the run would restart from scratch.
            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = _cfg(tmp_path, epochs=3)
    result = train_distributed(dataset, cfg, tmp_path / "run", fault_hook=kill_rank_1_once_in_epoch_2)
    assert marker.exists(), "the fault hook never fired"
    metrics = result.metrics
    # Epoch 2 died before its checkpoint: the restarted group resumed after epoch 1, not from scratch.
    assert metrics["resumed_from_epochs"] == [1]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "model.pt").exists()
    assert metrics["auc"] > 0.5
