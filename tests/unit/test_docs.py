"""docs/design.md stays true to the repository: its paths exist, its config keys are fields, its links
resolve, and nothing points at a design page outside the repository."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from marn.config import Config

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
FILE_SUFFIXES = (".py", ".md", ".yaml", ".toml", ".json", ".parquet", ".pt", ".html", ".sqlite")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh"}
SKIPPED_DIRS = {".venv", ".git", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}
OUTSIDE_DESIGN = "DESIGN" + ".md"  # split so this file does not match itself


def _code_spans(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def test_paths_named_in_the_design_exist() -> None:
    paths = {
        span.rstrip("/")
        for span in _code_spans(DESIGN.read_text())
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)+/?", span)
    }
    assert paths, "the design names no repository paths"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/design.md names paths that do not exist: {missing}"


def _has_field(model: type[BaseModel], dotted: list[str]) -> bool:
    field = model.model_fields.get(dotted[0])
    if field is None:
        return False
    if len(dotted) == 1:
        return True
    inner = field.annotation
    return isinstance(inner, type) and issubclass(inner, BaseModel) and _has_field(inner, dotted[1:])


def test_config_keys_named_in_the_design_are_fields() -> None:
    keys = {
        span
        for span in _code_spans(DESIGN.read_text())
        if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", span)
        and span.split(".")[0] in Config.model_fields
        and not span.endswith(FILE_SUFFIXES)
    }
    assert {"model.d1_weights", "model.lambda_role", "serve.feedback_window_s"} <= keys
    unknown = sorted(k for k in keys if not _has_field(Config, k.split(".")))
    assert not unknown, f"docs/design.md names config keys that do not exist: {unknown}"


@pytest.mark.parametrize("page", ["README.md", "docs/design.md"])
def test_relative_links_resolve(page: str) -> None:
    path = ROOT / page
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [
        link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")
    ]
    broken = sorted(link for link in local if link and not (path.parent / link).exists())
    assert not broken, f"{page}: broken links {broken}"
    if page == "README.md":
        assert "docs/design.md" in local


def _text_files() -> list[Path]:
    """The repository's text files, without descending into the venv, caches or build metadata."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        files += [Path(folder) / n for n in names if Path(n).suffix in TEXT_SUFFIXES or n == "Makefile"]
    return files


def test_nothing_points_at_a_design_page_outside_the_repository() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in _text_files()
        if OUTSIDE_DESIGN in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders, f"refer to docs/design.md instead: {offenders}"
