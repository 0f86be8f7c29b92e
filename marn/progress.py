"""Progress on the console for the Ray-backed commands: items/s, and the Ray Train workers' epochs on the
driver. The Ray callbacks that feed them (a live table of Tune trials, the Train controller's epochs) are in
:mod:`marn.ray_progress`, apart so that these helpers do not import Ray.

Each reporter takes the rich ``Console`` to write to. On a terminal it draws (a bar, a live table); on
anything else (a log file, a CI job, a captured test) it prints one plain line per event instead, so the
record stays readable.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """A task's mean rate since it was added, ``12.3 <unit>/s``: what the wait felt like, start-up included
    (rich's own speed column counts bytes, over the last updates only)."""

    def __init__(self, unit: str = "items"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        seconds = task.finished_time if task.finished else task.elapsed
        if not seconds or not task.completed:
            return Text("")
        return Text(f"{task.completed / seconds:.1f} {self.unit}/s", style="progress.data.speed")


def progress_bar(
    console: Console | None = None, *, enabled: bool = True, unit: str | None = None
) -> Progress:
    """The one progress-bar style of the commands and the training loop: description, bar, done/total, the
    mean rate in ``unit``/s when given, elapsed and remaining time. ``console`` None: rich's global one."""
    rate = [RateColumn(unit)] if unit is not None else []
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *rate,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


@contextmanager
def phase_bars(console: Console, unit: str = "items") -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(phase, done, total)`` hook (marn.embed.stage.ProgressHook) drawing one bar per phase
    with its rate; the bars stay on screen when the block ends (on a non-terminal console they print once
    then)."""
    bar = progress_bar(console, unit=unit)
    tasks: dict[str, TaskID] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def number(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def epoch_line(row: Mapping[str, Any]) -> str:
    """One epoch as the driver prints it: ``epoch 2  train loss 0.6812  valid AUC 0.7134  3.1 s``."""
    return (
        f"epoch {row['epoch']}  train loss {number(row.get('train_loss'), '.4f')}  "
        f"valid AUC {number(row.get('valid_auc'), '.4f')}  {number(row.get('seconds'), '.1f')} s"
    )


# ---------------------------------------------------------------------------------------------------------
# Ray Train: the workers' epochs on the driver
# ---------------------------------------------------------------------------------------------------------


def epoch_rows(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One epoch from every worker's report: the mean train loss over the ranks (each saw its own shard);
    validation AUC and seconds from rank 0 (every rank validates on the whole split)."""
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    first = metrics[0]
    return {
        "epoch": first.get("epoch"),
        "train_loss": sum(losses) / len(losses) if losses else None,
        "valid_auc": first.get("valid_auc"),
        "seconds": first.get("seconds"),
        "workers": len(metrics),
    }


class EpochPrinter:
    """Drains the epochs queue (fed by ``marn.ray_progress.EpochsToQueue``) on a driver thread while
    ``trainer.fit()`` blocks the main one, printing :func:`epoch_line` for each. A context manager: on exit
    it prints whatever is left and stops."""

    def __init__(self, queue: Any, print_line: Callable[[str], None], poll_s: float = 0.5):
        self.queue = queue
        self.print_line = print_line
        self.poll_s = poll_s
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="marn-epoch-lines", daemon=True)

    def __enter__(self) -> EpochPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._drain(block=False)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=True)

    def _drain(self, block: bool) -> None:
        from ray.util.queue import Empty

        try:
            row = self.queue.get(block=block, timeout=self.poll_s if block else None)
        except Empty:
            return
        while True:
            line = epoch_line(row)
            self.lines.append(line)
            self.print_line(line)
            try:
                row = self.queue.get(block=False)
            except Empty:
                return
