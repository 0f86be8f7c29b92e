"""Every third-party module the code imports is declared in pyproject.toml.

The library, its adapters and the `marn` script (marn, serve, components, pipelines, feature_repo, cli) may
import only the ``dependencies``; benchmarks may also import the ``bench`` extra, tests the ``dev`` and
``bench`` extras.
Import names map to distributions through ``importlib.metadata.packages_distributions()`` (``yaml`` ->
PyYAML, ``sklearn`` -> scikit-learn).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("marn", "serve", "components", "pipelines", "feature_repo", "cli")
BENCHMARKS = ("benchmarks",)
TESTS = ("tests",)
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {_normalise(_REQUIREMENT_NAME.match(r).group(1)) for r in requirements}


def top_level_imports(path: Path) -> dict[str, int]:
    """Absolute imports of one file: top-level module name -> the first line importing it."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def _is_local(module: str, path: Path) -> bool:
    """The repository's packages, or a module beside the file or in a folder above it within the
    repository (benchmarks import each other by name; tests import their conftest)."""
    if module in LIBRARY + BENCHMARKS + TESTS:
        return True
    for folder in path.parents:
        if (folder / f"{module}.py").is_file() or (folder / module / "__init__.py").is_file():
            return True
        if folder == ROOT:
            break
    return False


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # seconds in a large venv: once per session


def undeclared_imports(packages: tuple[str, ...], declared: set[str]) -> list[str]:
    distributions = _distributions()
    problems = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, lineno in top_level_imports(path).items():
                if module in sys.stdlib_module_names or _is_local(module, path):
                    continue
                where = f"{path.relative_to(ROOT)}:{lineno}: {module}"
                dists = {_normalise(d) for d in distributions.get(module, [])}
                if not dists:
                    problems.append(f"{where} is not installed, so its distribution is unknown")
                elif not dists & declared:
                    problems.append(f"{where} comes from {sorted(dists)}, not declared in pyproject.toml")
    return problems


@pytest.mark.parametrize(
    ("packages", "extras"),
    [(LIBRARY, ()), (BENCHMARKS, ("bench",)), (TESTS, ("dev", "bench"))],
    ids=["library", "benchmarks", "tests"],
)
def test_every_import_is_declared(packages: tuple[str, ...], extras: tuple[str, ...]) -> None:
    problems = undeclared_imports(packages, _declared(*extras))
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_undeclared_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "marn"
    package.mkdir()
    (package / "bad.py").write_text("import json\nimport numpy\n\ndef f():\n    from scipy import stats\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = undeclared_imports(("marn",), {"numpy"})
    assert problems == ["marn/bad.py:5: scipy comes from ['scipy'], not declared in pyproject.toml"]
