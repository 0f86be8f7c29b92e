"""A benchmark's finished work, kept in the repository so that a benchmark longer than one machine's life
goes on where it stopped.

The paper grid, and the COURIER and FLIP benchmarks after it, take longer on 2 cores than a working session or
a CI machine lives, and WORK (``.marn/...``) goes with the machine. A ledger (committed, e.g.
``benchmarks/results/paper-movielens-runs/``) mirrors WORK's layout but holds only what the report reads and
what cannot be rebuilt in minutes (a ``Layout`` names it per harness):

- every finished run's metrics file (a run is finished when it has one: the harnesses write it last);
- files that are only kept beside a finished marker: MARN seed 1's ``model.pt`` and ``curves.json`` (Figures
  4-6), a COURIER head's vector table once its metrics are written;
- records: the lambda0 searches' ``tune.json``, the held-out items, ``claim.json``; and ``timing.json`` and
  ``command.json``, which grow as the grid goes on;
- ``ledger.json``: the size and SHA-256 of every file of the data directory the runs read.

``restore`` copies the ledger into WORK where WORK lacks a file, so the harness skips every finished run; it
refuses a ledger made from other data (an imported and embedded MovieLens is byte-identical from machine to
machine here, so a difference means runs that would not compare). A run that was half way when its machine
went is trained again from its start: resume states are not kept (megabytes of optimizer state per run, for
at most one run's time per core).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.work_claim import data_fingerprint
from marn.data.files import write_atomic, write_text_atomic

LEDGER_FILE = "ledger.json"


@dataclass(frozen=True)
class Layout:
    """What a harness's ledger keeps, as globs relative to WORK."""

    finished: str  # a finished run's metrics file: counted as a run
    kept: tuple[str, ...] = ()  # other files kept as they are
    # (a finished marker's glob, names beside it kept once the marker exists: never a half-written run's)
    beside: tuple[tuple[str, tuple[str, ...]], ...] = ()
    running: tuple[str, ...] = ()  # records that grow: replaced on every save, restored only where absent
    data_exclude: tuple[str, ...] = ()  # data files the harness never reads (not in the fingerprint)

    def files(self, work: Path) -> list[Path]:
        """WORK-relative paths of what the ledger keeps, as they exist in ``work`` now."""
        work = Path(work)
        found = {
            p.relative_to(work)
            for glob in (self.finished, *self.kept, *self.running)
            for p in work.glob(glob)
        }
        for marker, names in self.beside:
            for done in work.glob(marker):
                found |= {(done.parent / n).relative_to(work) for n in names if (done.parent / n).exists()}
        return sorted(p for p in found if not p.name.startswith("."))  # an atomic writer's temporary files


def save(layout: Layout, work: Path, ledger: Path, data: Path) -> list[Path]:
    """Copy into ``ledger`` what it keeps from ``work`` and is new or changed there; returns those paths.

    Refuses to mix: a ledger made from other data than ``data`` is an error, not overwritten."""
    work, ledger = Path(work), Path(ledger)
    fingerprint = data_fingerprint(data, layout.data_exclude)
    _check_same_data(ledger, fingerprint, data)
    copied = []
    for rel in layout.files(work):
        source, target = work / rel, ledger / rel
        if target.exists() and target.read_bytes() == source.read_bytes():
            continue
        _copy(source, target)
        copied.append(rel)
    if copied or not (ledger / LEDGER_FILE).exists():
        _write_json(
            ledger / LEDGER_FILE,
            {
                "data": fingerprint,
                "finished_runs": len(list(ledger.glob(layout.finished))),
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    return copied


def restore(layout: Layout, ledger: Path, work: Path, data: Path) -> list[Path]:
    """Copy the ledger's files into ``work`` where ``work`` has none (WORK's own are never replaced: they
    are as new as the ledger's or newer); returns the paths copied. Nothing to restore from an absent
    ledger. Raises ValueError when the ledger was made from other data than ``data``."""
    ledger, work = Path(ledger), Path(work)
    if not (ledger / LEDGER_FILE).exists():
        return []
    _check_same_data(ledger, data_fingerprint(data, layout.data_exclude), data)
    copied = []
    for rel in layout.files(ledger):
        if not (work / rel).exists():
            _copy(ledger / rel, work / rel)
            copied.append(rel)
    return copied


def attach(layout: Layout, ledger: Path | None, work: Path, data: Path) -> Callable[[], None]:
    """What a harness's ``--ledger`` does: restore into ``work`` now, and return the ``save`` to call after
    each finished run (a no-op without a ledger)."""
    if ledger is None:
        return lambda: None
    restored = restore(layout, ledger, work, data)
    print(f"[ledger] {len(restored)} files restored from {ledger}", flush=True)

    def save_finished() -> None:
        save(layout, work, ledger, data)

    return save_finished


def _check_same_data(ledger: Path, fingerprint: dict[str, Any], data: Path) -> None:
    path = ledger / LEDGER_FILE
    if not path.exists():
        return
    kept = json.loads(path.read_text())["data"]
    if kept != fingerprint:
        raise ValueError(
            f"{ledger} was made from other data than {data} (files that differ: "
            f"{', '.join(_differing(kept, fingerprint))}); its runs would not compare with new ones. Import "
            "and embed the data as the Makefile's `paper` target does, or give another --ledger."
        )


def _differing(a: dict[str, Any], b: dict[str, Any]) -> Iterable[str]:
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))  # a stop while copying keeps it whole


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
