"""Run the pipeline on this machine with the KFP local runner: each task a subprocess in this environment.

The local runner executes tasks one at a time in dependency order, which suits 2 cores; artifacts land
under ``pipeline_root/<run>/<task>/``. kfp-kubernetes settings (GPU node, PVC, secrets) are ignored here.
"""

import contextlib
import json
import re
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kfp import local

from pipelines.marn_pipeline import PIPELINE_NAME, marn_pipeline


@dataclass(frozen=True)
class LocalRun:
    run_dir: Path  # pipeline_root/<pipeline>-<timestamp>
    stage_seconds: dict[str, float]  # task name -> wall seconds, in the order the tasks finished
    outputs: dict[str, dict] = field(default_factory=dict)  # task name -> its executor output (parameters)

    def artifact(self, task: str, name: str) -> Path:
        return self.run_dir / task / name


def run_local(
    config_text: str, data_dir: str | Path, pipeline_root: str | Path, model: str, baseline: str
) -> LocalRun:
    """Run the whole pipeline once; raises RuntimeError naming the failed task (its artifacts are kept)."""
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.glob(f"{PIPELINE_NAME}-*"))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    started = time.time()
    error: Exception | None = None
    log_path = pipeline_root / "last-run.log"
    with log_path.open("w") as log, contextlib.redirect_stdout(_TaskLines(log, sys.stdout)) as lines:
        try:
            _run_quietly(
                config=config_text,
                data_dir=str(Path(data_dir).resolve()),
                model_name=model,
                baseline_name=baseline,
            )
        except RuntimeError as err:  # the local runner raises on the first failed task
            error = RuntimeError(f"{err}\n--- last task output (full log: {log_path}) ---\n{lines.tail()}")
    runs = sorted(set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - before)
    if not runs:
        raise RuntimeError(f"the KFP local runner wrote no run under {pipeline_root}") from error
    result = _collect(runs[-1], started)
    log_path.replace(result.run_dir / "pipeline.log")
    if error is not None:
        raise PipelineFailed(str(error), result) from error
    return result


class PipelineFailed(RuntimeError):
    """A task failed; ``run`` holds what the finished tasks left (e.g. the validation report)."""

    def __init__(self, message: str, run: LocalRun):
        super().__init__(message)
        self.run = run


def _run_quietly(config: str, data_dir: str, model_name: str, baseline_name: str) -> None:
    """The pipeline call, without the local runner's warnings that cluster-only settings are ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        marn_pipeline(config=config, data_dir=data_dir, model_name=model_name, baseline_name=baseline_name)


class _TaskLines:
    """stdout during a run: everything to the log file, only task start/finish lines to the console.

    The local runner prints each task's whole executor input and output; people want the stage list.
    """

    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    _SHOW = re.compile(r"Executing task|finished with status")

    def __init__(self, log: TextIO, console: TextIO, keep: int = 60):
        self.log, self.console, self.last = log, console, deque(maxlen=keep)
        self._partial = ""

    def write(self, text: str) -> int:
        self.log.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            plain = self._ANSI.sub("", line)
            self.last.append(plain)
            if self._SHOW.search(plain):
                self.console.write(plain.split(" - INFO - ")[-1] + "\n")
                self.console.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def tail(self) -> str:
        return "\n".join(self.last)


def _collect(run_dir: Path, started: float) -> LocalRun:
    """Stage times from the order the tasks wrote their executor outputs (the runner is sequential)."""
    finished = sorted(run_dir.glob("*/executor_output.json"), key=lambda p: p.stat().st_mtime)
    seconds, outputs, previous = {}, {}, started
    for path in finished:
        done = path.stat().st_mtime
        seconds[path.parent.name] = done - previous
        previous = done
        outputs[path.parent.name] = json.loads(path.read_text()).get("parameterValues", {})
    return LocalRun(run_dir, seconds, outputs)


def data_is_new(data_dir: str | Path, state_file: str | Path) -> tuple[bool, str]:
    """Whether the data changed since the last successful local run (``marn pipeline run --if-new-data``)."""
    from marn.registry import SOURCE_TABLES, data_snapshot

    version = data_snapshot(data_dir, SOURCE_TABLES)["version"]  # the embed stage's files do not count
    state_file = Path(state_file)
    last = json.loads(state_file.read_text()).get("data_version") if state_file.exists() else None
    return version != last, version


def remember_data(state_file: str | Path, version: str, run: LocalRun) -> None:
    state_file = Path(state_file)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"data_version": version, "run_dir": str(run.run_dir)}, indent=2) + "\n")
