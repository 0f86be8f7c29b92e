"""The training-curve figure written next to each run's ``metrics.json``: train loss and validation AUC per
epoch, from the same history the metrics record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CURVE = "training_curve.png"
POINT_COLOR = "#d62728"  # the epochs' markers, apart from the line's colour so each point stands out
LINE_COLOR = "#1f77b4"


def write_training_curve(history: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Two panels (train loss, validation AUC), one point per epoch of ``history`` (``metrics.json``'s rows:
    epoch, train_loss, valid_auc). Raises ValueError on an empty history."""
    # matplotlib's object API with the Agg canvas: no pyplot, so no global figure state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("an empty history has no curve")
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(8, 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, auc_axes = figure.subplots(1, 2)
    for axes, key, label in ((loss_axes, "train_loss", "train loss"), (auc_axes, "valid_auc", "valid AUC")):
        axes.plot(
            epochs,
            [row[key] for row in history],
            color=LINE_COLOR,
            marker="o",
            markerfacecolor=POINT_COLOR,
            markeredgecolor=POINT_COLOR,
        )
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_xticks(epochs)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, format="png", dpi=100)
    return path
