"""The dependency rule: the library (marn/) imports no adapter and not the console script's package, at the
top of a module or inside a function, so all of it stays usable and testable without them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "marn"
# The adapters, the benchmarks and `cli` (which assembles `marn` from the library and the adapters).
FORBIDDEN = {"components", "pipelines", "serve", "benchmarks", "cli"}
DYNAMIC_IMPORTS = {"import_module", "__import__"}  # importlib.import_module("serve.app") counts too


def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import anywhere in the tree, dynamic ones with a literal name too."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def forbidden_imports(package: Path) -> list[str]:
    """``path:line: module`` for each import of a forbidden top-level package under ``package``."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in sorted(_imported_names(tree)):
            if module.split(".")[0] in FORBIDDEN:
                problems.append(f"{path.relative_to(package.parent)}:{line}: {module}")
    return problems


def test_the_library_imports_no_adapter() -> None:
    files = list(LIBRARY.rglob("*.py"))
    assert len(files) > 20, f"expected the library's modules under {LIBRARY}, found {len(files)}"
    problems = forbidden_imports(LIBRARY)
    assert not problems, "marn/ must not import the adapters or cli:\n  " + "\n  ".join(problems)


def test_the_rule_sees_imports_anywhere(tmp_path: Path) -> None:
    """Top-level, inside a function, `from x import`, submodules and importlib: each one is caught."""
    package = tmp_path / "lib"
    package.mkdir()
    (package / "fine.py").write_text("import json\nfrom marn.config import Config\nfrom . import serve\n")
    (package / "bad.py").write_text(
        "import serve.control\n"
        "def f():\n"
        "    from pipelines.local import run_local\n"
        "    import importlib\n"
        "    return importlib.import_module('components.train')\n"
        "class C:\n"
        "    def g(self):\n"
        "        import benchmarks.paper, cli.main\n"
    )
    problems = [p.split(":", 1)[1] for p in forbidden_imports(package)]
    assert problems == [
        "1: serve.control",
        "3: pipelines.local",
        "5: components.train",
        "8: benchmarks.paper",
        "8: cli.main",
    ]
