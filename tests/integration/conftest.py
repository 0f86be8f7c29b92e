"""Fixtures shared by the integration tests."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# A whole-pipeline world small enough for a test: every stage runs, each in seconds.
TINY_PIPELINE: dict[str, Any] = {
    "synth": {"users": 60, "items": 50, "image_size": 16},
    "samples": {"max_history": 10},
    "train": {"epochs": 1},
    "features": {"title_len": 8},
    "model": {"modality_dim": 16, "rep_dim": 16, "sequence_dim": 16, "title_filters": 4, "hidden": [16, 8]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_settings() -> Callable[[Path], dict[str, Any]]:
    """``make(work_dir)`` -> config settings of TINY_PIPELINE with their own work dir and free serve ports
    (tests never collide with a service a developer left running on 8000)."""

    def make(work_dir: Path) -> dict[str, Any]:
        settings = copy.deepcopy(TINY_PIPELINE)
        settings["paths"] = {"work_dir": str(work_dir)}
        settings["serve"] = {"port": free_port(), "dashboard_port": free_port()}
        return settings

    return make
