"""The paper grid's finished work, kept in the repository so that a grid longer than one machine's life goes
on where it stopped.

The grid takes longer on 2 cores than a working session or a CI machine lives, and WORK (``.marn/paper``)
goes with the machine. The ledger (``benchmarks/results/paper-movielens-runs/``, committed) mirrors WORK's
layout but holds only what the report reads and nothing that can be rebuilt in minutes:

- every finished run's ``metrics.json`` (a run is finished when it has one: ``train_one`` writes it last);
- for MARN seed 1, whose weights Figures 4 and 5 read and whose per-step losses Figure 6a plots, its
  ``model.pt`` and ``curves.json`` too;
- every lambda0 search's ``tune.json``, the held-out items of the cold stage, and ``timing.json`` and
  ``command.json`` (the report's wall seconds and commands);
- ``ledger.json``: the SHA-256 of every file of the data directory the runs read.

``restore`` copies the ledger into WORK where WORK lacks a file, so ``run`` skips every finished run and
search; it refuses a ledger made from other data (an imported and embedded MovieLens is byte-identical from
run to run on these machines, so a difference means the runs would not be comparable). A run that was half
way when its machine went is trained again from its start: its ``resume.pt`` is not kept (megabytes of
optimizer state per run, for at most one run's time per core).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from marn.data.files import write_atomic, write_text_atomic
from marn.train import METRICS

LEDGER_FILE = "ledger.json"
# WORK-relative files kept whole for the figures of one run (benchmarks/paper_report/report.py reads them)
FIGURE_RUN = Path("runs") / "marn" / "seed-1"
FIGURE_FILES = ("model.pt", "curves.json")
# Files that grow as the grid goes on (the running total of stage seconds, the list of invocations): the
# ledger's copy is replaced by WORK's on every save, and restored only into a WORK without one.
RUNNING_RECORDS = ("timing.json", "command.json")


def data_fingerprint(data: Path) -> dict[str, str]:
    """{file name: SHA-256} of every file directly in ``data`` (the imported and embedded dataset)."""
    files = sorted(p for p in Path(data).iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"{data}: no data files to fingerprint")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def kept_files(work: Path) -> list[Path]:
    """WORK-relative paths of what the ledger keeps, as they exist in ``work`` now."""
    work = Path(work)
    found = [p.relative_to(work) for p in work.glob(f"*/*/seed-*/{METRICS}")]
    found += [p.relative_to(work) for p in work.glob("tune/*/tune.json")]
    found += [p.relative_to(work) for p in work.glob("cold/held_out.json")]
    if (work / FIGURE_RUN / METRICS).exists():  # a finished run's figure files, not a half-written run's
        found += [FIGURE_RUN / name for name in FIGURE_FILES if (work / FIGURE_RUN / name).exists()]
    found += [Path(name) for name in RUNNING_RECORDS if (work / name).exists()]
    return sorted(found)


def save(work: Path, ledger: Path, data: Path) -> list[Path]:
    """Copy into ``ledger`` what it keeps from ``work`` and is new or changed there; returns those paths.

    Refuses to mix: a ledger made from other data than ``data`` is an error, not overwritten."""
    work, ledger = Path(work), Path(ledger)
    fingerprint = data_fingerprint(data)
    _check_same_data(ledger, fingerprint, data)
    copied = []
    for rel in kept_files(work):
        source, target = work / rel, ledger / rel
        if target.exists() and target.read_bytes() == source.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
        copied.append(rel)
    if copied or not (ledger / LEDGER_FILE).exists():
        runs = sum(1 for rel in kept_files(ledger) if rel.name == METRICS)
        _write_json(
            ledger / LEDGER_FILE,
            {
                "data": fingerprint,
                "finished_runs": runs,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    return copied


def restore(ledger: Path, work: Path, data: Path) -> list[Path]:
    """Copy the ledger's files into ``work`` where ``work`` has none (WORK's own are never replaced: they
    are as new as the ledger's or newer); returns the paths copied. Nothing to restore from an absent or
    empty ledger. Raises ValueError when the ledger was made from other data than ``data``."""
    ledger, work = Path(ledger), Path(work)
    if not (ledger / LEDGER_FILE).exists():
        return []
    _check_same_data(ledger, data_fingerprint(data), data)
    copied = []
    for rel in kept_files(ledger):
        target = work / rel
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp, source=ledger / rel: shutil.copyfile(source, tmp))
        copied.append(rel)
    return copied


def _check_same_data(ledger: Path, fingerprint: dict[str, str], data: Path) -> None:
    path = ledger / LEDGER_FILE
    if not path.exists():
        return
    kept = json.loads(path.read_text())["data"]
    if kept != fingerprint:
        names = kept.keys() | fingerprint.keys()
        differ = sorted(name for name in names if kept.get(name) != fingerprint.get(name))
        raise ValueError(
            f"{ledger} was made from other data than {data} (files that differ: {', '.join(differ)}); its "
            "runs would not compare with new ones. Import and embed the data as the Makefile's `paper` "
            "target does, or give another --ledger."
        )


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
