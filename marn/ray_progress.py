"""Ray's side of the progress display (:mod:`marn.progress`): a live table of Tune trials, and the Ray Train
callback that sends each epoch to the driver.

Module-level classes, so that Tune (which pickles its run config, callbacks included, into the experiment
folder) and Ray Train (which ships its callbacks to the controller actor) pickle them by reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.train import UserCallback
from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from marn.progress import epoch_rows, number

TRIAL_COLUMNS = ("trial", "epochs", "valid AUC", "state")  # the searched values go after "trial"


class TrialTable(Callback):
    """A Ray Tune callback (it runs on the driver) keeping one row per trial: id, the searched values, epochs
    done, the last validation AUC, state. On a terminal it draws a rich Live table refreshed as results
    arrive; on any other console it prints one line per result. A context manager around ``tuner.fit()``
    starts and stops the live display."""

    def __init__(self, console: Console | None, searched: Sequence[str] = ("lambda0", "lr")):
        self.console = console
        self.searched = tuple(searched)
        self.rows: dict[str, dict[str, Any]] = {}
        self.lines: list[str] = []  # what was printed without a terminal, in order
        self._live: Live | None = None

    def __enter__(self) -> TrialTable:
        if self.console is not None and self.console.is_terminal:
            self._live = Live(self.table(), console=self.console, auto_refresh=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.table(), refresh=True)
            self._live.stop()
            self._live = None

    def __getstate__(self) -> dict[str, Any]:
        # What Tune pickles: the rows, not the console or the live display; an unpickled copy reports nothing.
        return {**self.__dict__, "console": None, "_live": None}

    def table(self) -> Table:
        name, *rest = TRIAL_COLUMNS
        table = Table(name, *self.searched, *rest, title="Ray Tune trials")
        for trial_id, row in self.rows.items():
            table.add_row(
                trial_id,
                *(number(row.get(name), ".4g") for name in self.searched),
                str(row["epochs"]),
                number(row.get("valid_auc"), ".4f"),
                row["state"],
            )
        return table

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, "ERROR")

    def _update(self, trial: Any, state: str, result: Mapping[str, Any] | None = None) -> None:
        row = self.rows.setdefault(
            trial.trial_id, {name: trial.config.get(name) for name in self.searched} | {"epochs": 0}
        )
        row["state"] = state
        if result is not None:
            row["epochs"] = result.get("epoch", row["epochs"])
            row["valid_auc"] = result.get("valid_auc", row.get("valid_auc"))
        if self.console is None:
            return
        if self._live is not None:
            self._live.update(self.table(), refresh=True)
            return
        values = "  ".join(f"{name} {number(row.get(name), '.4g')}" for name in self.searched)
        line = (
            f"trial {trial.trial_id}  {values}  epochs {row['epochs']}  "
            f"valid AUC {number(row.get('valid_auc'), '.4f')}  {state}"
        )
        self.lines.append(line)
        self.console.print(line, highlight=False, soft_wrap=True)  # one line each, whatever the width


class EpochsToQueue(UserCallback):
    """A Ray Train callback. It runs in the Train controller (an actor), not the driver, so it puts each
    epoch (:func:`marn.progress.epoch_rows` of every worker's report) on ``queue``, a
    ``ray.util.queue.Queue`` that the driver drains (:class:`marn.progress.EpochPrinter`)."""

    def __init__(self, queue: Any):
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
        if metrics:
            self.queue.put(epoch_rows(metrics))
