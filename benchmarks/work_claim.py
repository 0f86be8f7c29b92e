"""One WORK directory, one set of benchmark settings: the claim that keeps resumed runs comparable.

The benchmark harnesses (``benchmarks.courier``, ``benchmarks.flip``) read a finished run back instead of
training it again, and reuse stored COURIER heads and FLIP pretrainings. That is only sound while every run
in WORK was made with the same config and the same data. The first run writes ``WORK/claim.json`` (the
harness, the config's ``model_dump(mode="json")`` and a fingerprint of the data directory); every later run
compares its own settings with it and refuses to start on any difference, listing each one. Arms, models and
seeds are not part of the claim: processes that run disjoint ``--arms`` into one WORK, or that add seeds
later, share it.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from marn.config import Config
from marn.data.files import content_hash, write_text_atomic

CLAIM = "claim.json"
MAX_LINES = 20  # differences listed in the refusal; the rest are counted
MAX_VALUE = 72  # characters of one value in the refusal
_ABSENT = object()


def data_fingerprint(data: Path, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """File name -> ``{"size", "sha256"}`` of each regular file directly inside ``data`` (names sorted; links
    followed; hidden files, such as an atomic writer's temporary ones, and the names in ``exclude`` skipped).
    The hash is streamed in chunks (:func:`marn.data.files.content_hash`)."""
    if not Path(data).is_dir():
        raise FileNotFoundError(f"{data} is not a directory: no data to fingerprint")
    skip = set(exclude)
    files = sorted(
        p for p in Path(data).iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in skip
    )
    return {p.name: {"size": p.stat().st_size, "sha256": content_hash(p)} for p in files}


def work_settings(
    harness: str, cfg: Config, data: Path | None, exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """What a WORK directory is claimed for: the harness, the whole config and the data's fingerprint."""
    if data is None:
        raise ValueError(
            f"{harness}: the dataset was not read from a directory (Dataset.root is None), so WORK cannot be "
            "claimed for it; read it with marn.data.schema.read_dataset"
        )
    return {
        "harness": harness,
        "config": cfg.model_dump(mode="json"),
        "data": data_fingerprint(data, exclude),
    }


def claim_work(work: Path, settings: dict[str, Any]) -> None:
    """Claim ``work`` for ``settings`` (plain JSON data), or check that it is already claimed for them.

    The first call writes ``WORK/claim.json`` (whole or not at all, and only if no other process wrote one
    first); a later call raises ValueError listing every key path whose value differs (``config.model.rep_dim:
    64 -> 256``, the claimed value first) and saying how to proceed."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / CLAIM
    settings = json.loads(json.dumps(settings))  # tuples -> lists, keys -> str: what the file reads back
    if not path.exists():
        _create(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    try:
        claimed = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path} cannot be read ({err}); delete it if the runs in {work} should count for the current "
            "settings, or use another --work"
        ) from None
    lines = differences(claimed, settings)
    if not lines:
        return
    shown = lines[:MAX_LINES]
    if len(lines) > MAX_LINES:
        shown.append(f"... and {len(lines) - MAX_LINES} more")
    raise ValueError(
        f"{work} holds runs of other settings than this run's ({path}; claimed -> now):\n"
        + "\n".join(f"  {line}" for line in shown)
        + "\nResuming there would pair runs of different settings in one comparison. Use another --work for "
        f"these settings, or delete {path} if the runs there should count anyway (the next run then claims "
        f"{work} for its own settings)."
    )


def differences(claimed: Any, now: Any) -> list[str]:
    """``key.path: claimed -> now`` for every flattened key whose value differs, in key order."""
    old, new = _flatten(claimed), _flatten(now)
    lines = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if not _same(a, b):
            lines.append(f"{key or '(the settings)'}: {_show(a)} -> {_show(b)}")
    return lines


def _create(path: Path, text: str) -> None:
    """Write ``path`` whole, unless it exists: a hard link of a finished temporary file cannot be half
    written, and it fails when another process linked its claim first (which is then compared)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: atomic, but not exclusive
            if not path.exists():
                write_text_atomic(path, text)
    finally:
        tmp.unlink(missing_ok=True)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b  # 1 and 1.0, or 1 and True, are other settings


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"
