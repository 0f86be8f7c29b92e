"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# /work/main/tests/conftest.py -> /work/shared: the shared folder sits beside the repository checkout.
_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared research-data folder (holding ``datasets/`` and ``models/``), never copied into the repo.

    Defaults to ``shared/`` beside the repository; override with the environment variable MARN_SHARED_DIR.
    Tests that need it are skipped, with the path tried, when it is absent.
    """
    path = Path(os.environ.get("MARN_SHARED_DIR", _DEFAULT_SHARED)).expanduser()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}; set MARN_SHARED_DIR")
    return path
