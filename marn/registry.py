"""The model registry: versioned model artifacts, a model card each, and one champion per model name.

Layout (a directory; a bucket or a PVC in the cluster)::

    REGISTRY/<model>/v0001/model.pt         the checkpoint (``marn.train.load_trained`` reads it)
    REGISTRY/<model>/v0001/metrics.json     test metrics as the training run wrote them
    REGISTRY/<model>/v0001/card.json        model card: config, data snapshot, metrics, gate decision
    REGISTRY/<model>/champion.json          {"version": "v0001", ...}: what serving loads

Registration assembles the version, runs a ``before_champion`` step on it (MARN publishes the version's
item representations to Feast there), and only then flips ``champion.json``: whatever starts from the new
champion finds everything it needs already in place.

The evaluation gate (:func:`gate`) lets a candidate in only when it beats the champion's test AUC by
``min_improvement`` (or there is no champion); a registered model becomes the champion at once. Both AUCs
are measured on the candidate's test split: the champion's checkpoint is re-scored on it (AUCs of two
different splits say nothing about which model is better). When the champion cannot be scored there, the
gate refuses and says why.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from marn.data.files import content_hash, write_text_atomic

CARD = "card.json"
CHAMPION = "champion.json"
SOURCE_TABLES = ("events", "items", "users", "item_stats")  # what a dataset arrives with
# what the embed stage (and the courier stage, embed.method courier) adds to it
DERIVED_TABLES = ("image_embeddings", "title_embeddings", "courier_embeddings")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    candidate_auc: float
    reason: str
    champion_auc: float | None = None  # None: no champion yet
    champion_version: str | None = None


@dataclass(frozen=True)
class RegisteredModel:
    model: str
    version: str
    path: Path  # the version directory

    @property
    def checkpoint(self) -> Path:
        return self.path / "model.pt"

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads((self.path / "metrics.json").read_text())

    @property
    def card(self) -> dict[str, Any]:
        return json.loads((self.path / CARD).read_text())


def champion(registry_dir: str | Path, model: str) -> RegisteredModel | None:
    """The registered version serving should load for ``model``, or None before the first registration."""
    pointer = Path(registry_dir) / model / CHAMPION
    if not pointer.exists():
        return None
    version = json.loads(pointer.read_text())["version"]
    return RegisteredModel(model, version, Path(registry_dir) / model / version)


def registered_version(checkpoint: str | Path) -> str:
    """The registry version of a registered checkpoint (``REGISTRY/<model>/<version>/model.pt``), from its
    model card; FileNotFoundError for a checkpoint outside the registry."""
    card = Path(checkpoint).parent / CARD
    if not card.exists():
        raise FileNotFoundError(f"{checkpoint} is not a registered model (no {CARD} beside it)")
    return str(json.loads(card.read_text())["version"])


def versions(registry_dir: str | Path, model: str) -> list[str]:
    root = Path(registry_dir) / model
    return sorted(p.name for p in root.glob("v[0-9]*") if (p / CARD).exists()) if root.is_dir() else []


def gate(
    candidate_metrics: dict[str, Any],
    current: RegisteredModel | None,
    min_improvement: float,
    champion_metrics: dict[str, Any] | None = None,
    unscored_because: str | None = None,
) -> GateDecision:
    """Register only a model that beats the champion's test AUC by at least ``min_improvement``.

    ``champion_metrics``: the champion re-scored on the candidate's test split; without them (the champion
    could not be scored there, ``unscored_because`` says why) the gate refuses: the champion's own stored
    AUC comes from another split and is no basis for a comparison.
    """
    auc = float(candidate_metrics["auc"])
    if current is None:
        return GateDecision(True, auc, "no champion yet")
    if champion_metrics is None:
        return GateDecision(
            False,
            auc,
            f"champion {current.version} could not be scored on the candidate's test split "
            f"({unscored_because or 'no re-scored metrics given'}); refusing to compare AUCs of different "
            f"splits. Retrain the champion on this data or retire it ({current.path.parent / CHAMPION})",
            None,
            current.version,
        )
    best = float(champion_metrics["auc"])
    passed = auc >= best + min_improvement if min_improvement > 0 else auc > best
    verdict = "beats" if passed else "does not beat"
    return GateDecision(
        passed,
        auc,
        f"candidate AUC {auc:.4f} {verdict} champion {current.version} AUC {best:.4f} on the same test split"
        + (f" by the required {min_improvement:.4f}" if min_improvement > 0 else ""),
        best,
        current.version,
    )


def register_model(
    registry_dir: str | Path,
    run_dir: str | Path,
    data_dir: str | Path,
    decision: GateDecision,
    extra_card: dict[str, Any] | None = None,
    before_champion: Callable[[RegisteredModel], dict[str, Any]] | None = None,
) -> RegisteredModel:
    """Copy a training run (``model.pt``, ``metrics.json``) into the next version and make it the champion.

    The version directory is assembled under a temporary name and renamed into place, so a crash never
    leaves a half-written version that looks registered. ``before_champion`` runs on the assembled
    version (its ``path`` still the temporary directory) before the card is written and the champion
    flips; what it returns joins the card. When it fails, nothing is registered.
    """
    if not decision.passed:
        raise ValueError(f"the evaluation gate refused this model: {decision.reason}")
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = metrics["model"]
    root = Path(registry_dir) / model
    root.mkdir(parents=True, exist_ok=True)
    taken = versions(registry_dir, model)
    version = f"v{int(taken[-1][1:]) + 1 if taken else 1:04d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
    for name in ("model.pt", "metrics.json"):
        shutil.copy2(run_dir / name, staging / name)
    prepared: dict[str, Any] = {}
    if before_champion is not None:
        try:
            prepared = before_champion(RegisteredModel(model, version, staging))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    card = {
        "model": model,
        "version": version,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": {k: metrics[k] for k in ("auc", "user_auc", "logloss") if k in metrics},
        "valid": metrics.get("valid"),
        "gate": asdict(decision),
        "data": data_snapshot(data_dir),
        "code": _git_commit(),
        "source_run": str(run_dir.resolve()),
        **(extra_card or {}),
        **prepared,
    }
    (staging / CARD).write_text(json.dumps(card, indent=2) + "\n")
    staging.rename(root / version)
    write_text_atomic(
        root / CHAMPION, json.dumps({"version": version, "auc": card["metrics"].get("auc")}) + "\n"
    )
    return RegisteredModel(model, version, root / version)


def data_snapshot(
    data_dir: str | Path, tables_to_hash: tuple[str, ...] = SOURCE_TABLES + DERIVED_TABLES
) -> dict[str, Any]:
    """What the model was trained on: the data directory and a sha256 per canonical table file."""
    data_dir = Path(data_dir)
    tables = {}
    for name in tables_to_hash:
        path = data_dir / f"{name}.parquet"
        if path.exists():
            tables[name] = content_hash(path)
    digest = hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()
    return {"data_dir": str(data_dir.resolve()), "tables": tables, "version": digest[:16]}


def _git_commit() -> str | None:
    """The code version, when the package runs from a git checkout (None in a built image)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
