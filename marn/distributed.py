"""Ray Train: the same ``fit`` loop in N DDP workers, checkpointed every epoch and resumed after a failure.

The driver builds samples, catalogue and item features once and puts them in Ray's object store; each
worker trains on its shard of the training samples and validates on the whole validation split, so all
ranks see the same AUC and stop together. Rank 0 checkpoints the full ``FitState`` every epoch; a restarted
worker group resumes from the latest. The driver then scores the best weights on test exactly as
``train_model`` does (``marn.train.save_run``), adding ``workers`` and ``resumed_from_epochs`` to the metrics.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from marn.config import Config
from marn.data.samples import Samples
from marn.data.schema import Dataset
from marn.data.tensors import EncodedSamples
from marn.ray_runtime import ray_session
from marn.train import EpochResult, FitState, TrainResult, fit, prepare_inputs, save_run, seed_everything

if TYPE_CHECKING:
    from ray.train import Checkpoint

STATE_FILE = "fit_state.pt"  # inside each Ray Train checkpoint directory
CHECKPOINTS_KEPT = 2  # a resume needs only the latest; the one before costs little and helps a post-mortem

# Test hook: called on every worker as fault_hook(epoch, world_rank) after each epoch, before its report.
FaultHook = Callable[[int, int], None]


def train_distributed(
    dataset: Dataset,
    cfg: Config,
    out_dir: str | Path,
    samples: Samples | None = None,
    show_progress: bool = False,
    fault_hook: FaultHook | None = None,
    print_epoch: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``cfg.train.model`` with Ray Train on ``cfg.distributed.workers`` workers; write the files
    ``train_model`` writes (``model.pt``, ``metrics.json`` plus ``workers``) into ``out_dir``.

    ``samples``: prebuilt DIN samples (the pipeline's come from Feast); None builds them from ``dataset``.
    ``show_progress``: rank 0's progress bar, in the worker log. ``fault_hook``: for fault-tolerance tests
    only, see :data:`FaultHook`; it must be picklable. ``print_epoch``: gets one line per epoch on the driver
    (epoch, the workers' mean train loss, valid AUC, seconds) as the workers report it (``marn.progress``).
    Each call is a new Ray Train run (its own directory under the storage path), so a rerun never resumes
    from an older run's checkpoints.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from marn.models import build_model

    dist = cfg.distributed
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    started = time.perf_counter()
    inputs = prepare_inputs(dataset, cfg, samples=samples)
    # Built here first so an unknown model name fails before Ray starts; scores the test split at the end.
    model = build_model(cfg.train.model, inputs.catalog, inputs.features, cfg.model)
    if len(inputs.train) < dist.workers:
        raise ValueError(f"{len(inputs.train)} training samples cannot be shared by {dist.workers} workers")
    storage = Path(dist.storage_path or out_dir / "ray").resolve()  # Ray wants an absolute path
    run_name = f"train-{cfg.train.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    with ray_session(cfg.ray):
        loop_config = {
            "cfg": cfg,
            "catalog": ray.put(inputs.catalog),
            "features": ray.put(inputs.features),
            "train": ray.put(inputs.train),
            "valid": ray.put(inputs.valid),
            "show_progress": show_progress,
            "fault_hook": fault_hook,
        }
        with _epoch_lines(print_epoch) as callbacks:
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config=loop_config,
                scaling_config=ScalingConfig(
                    num_workers=dist.workers,
                    use_gpu=dist.use_gpu,
                    resources_per_worker={"CPU": dist.cpus_per_worker},
                ),
                run_config=RunConfig(
                    name=run_name,
                    storage_path=str(storage),
                    failure_config=FailureConfig(max_failures=dist.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                    callbacks=callbacks,
                ),
            )
            result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {storage / run_name} finished without a checkpoint")
        state, resumed_from = read_checkpoint(result.checkpoint)

    extra = {"workers": dist.workers, "resumed_from_epochs": resumed_from, "ray_run": str(storage / run_name)}
    return save_run(model, state.best_state, list(state.history), inputs, cfg, out_dir, started, extra)


@contextmanager
def _epoch_lines(print_epoch: Callable[[str], None] | None) -> Iterator[list[Any]]:
    """The Train callbacks that bring each epoch to ``print_epoch`` on the driver (none without one)."""
    if print_epoch is None:
        yield []
        return
    from ray.util.queue import Queue

    from marn.progress import EpochPrinter
    from marn.ray_progress import EpochsToQueue

    queue = Queue(actor_options={"num_cpus": 0})  # a mailbox: it must not take a worker's CPU
    try:
        with EpochPrinter(queue, print_epoch):
            yield [EpochsToQueue(queue)]
    finally:
        queue.shutdown()


def shard(data: EncodedSamples, rank: int, world_size: int, seed: int) -> EncodedSamples:
    """This rank's share of the samples: a seeded shuffle of whole request groups, cut into equal parts.

    Equal sizes because DDP needs every rank to take the same number of steps (up to ``world_size - 1``
    samples are left out). Shuffled by group (``EncodedSamples.shuffled``) so a positive and its negative,
    which share one history, land on the same rank (and a strided split would give rank 0 every positive).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    per_rank = len(data) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(data)} samples cannot be shared by {world_size} workers")
    order = data.shuffled(torch.Generator().manual_seed(seed))
    index = order[: per_rank * world_size].view(world_size, per_rank)[rank].sort().values
    return data.subset(index)


def write_checkpoint(directory: Path, state: FitState, resumed_from: list[int]) -> None:
    torch.save({"fit": state.to_dict(), "resumed_from": resumed_from}, directory / STATE_FILE)


def read_checkpoint(checkpoint: Checkpoint) -> tuple[FitState, list[int]]:
    """The ``FitState`` in a Ray Train checkpoint and the epochs earlier attempts resumed from."""
    with checkpoint.as_directory() as directory:
        path = Path(directory) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: not a marn training checkpoint")
        saved = torch.load(path, map_location="cpu", weights_only=True)
    return FitState.from_dict(saved["fit"]), list(saved["resumed_from"])


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: ``fit`` on this rank's shard; every rank reports each epoch, rank 0 with the
    checkpoint (Train V2: ``report`` is a barrier, so all ranks call it equally often)."""
    import ray.train
    from ray.train.torch import prepare_model

    from marn.models import build_model

    cfg: Config = config["cfg"]
    fault_hook: FaultHook | None = config["fault_hook"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    catalog, features, train, valid = ray.get([config[k] for k in ("catalog", "features", "train", "valid")])

    seed_everything(cfg.train.seed)
    model = prepare_model(
        build_model(cfg.train.model, catalog, features, cfg.model),
        parallel_strategy_kwargs={
            # Some ablations (base_image) keep ID tables they never use; DDP fails on those unless told.
            "find_unused_parameters": True,
            # Buffers include the item feature tables: too big to broadcast every step. ``fit`` syncs the
            # learnt ones (running statistics) from rank 0 before each validation instead.
            "forward_sync_buffers": False,
        },
    )
    resume, resumed_from = None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume, resumed_from = read_checkpoint(checkpoint)
        resumed_from = [*resumed_from, resume.epoch]

    def report(result: EpochResult, state: FitState) -> None:
        if fault_hook is not None:
            fault_hook(result.epoch, rank)
        metrics = result.flat_metrics()
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint(Path(directory), state, resumed_from)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    fit(
        model,
        shard(train, rank, world_size, cfg.train.seed),
        valid,
        cfg.train,
        on_epoch=report,
        show_progress=config["show_progress"] and rank == 0,
        resume=resume,
    )
