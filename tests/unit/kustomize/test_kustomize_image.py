"""The image: the Dockerfile and .dockerignore, read (Docker is not on the test machines)."""

from __future__ import annotations

import json
import re
import tomllib

from kustomize_helpers import (
    ROOT,
    constraint_pin,
    project_image,
)

# ------------------------------------------------------------------------------------------------ image


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def test_dockerfile_pins_installs_with_constraints_and_runs_marn_unprivileged() -> None:
    """Docker is not on the test machines, so the image is checked by reading its Dockerfile."""
    instructions = dockerfile_instructions()
    (base,) = [args for keyword, args in instructions if keyword == "FROM"]
    python = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-\w+", base)
    assert python, f"FROM {base}: pin an exact Python release"
    assert f"{python[1]}.{python[2]}" == "3.11"  # what constraints.txt was resolved on

    runs = [args for keyword, args in instructions if keyword == "RUN"]
    pip_calls = [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]
    assert len(pip_calls) >= 3
    for call in pip_calls:
        assert "-c constraints.txt" in call, f"pip without the constraints file: {call}"
    torch = constraint_pin("torch")
    # torch first, from the chosen index (CPU or CUDA build)
    assert f"torch=={torch}" in pip_calls[0] and "${TORCH_INDEX_URL}" in pip_calls[0]
    assert any(keyword == "ARG" and args.startswith("TORCH_INDEX_URL=") for keyword, args in instructions)
    assert any(re.search(r"pip install .*\s\.$", call) for call in pip_calls)  # the project itself
    assert any("wget" in run for run in runs)  # KubeRay's probes run wget in Ray containers

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    last_user = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in instructions[last_user:]), "RUN after USER needs root"
    (entrypoint,) = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["marn"]
    copied = {args.split()[0] for keyword, args in instructions if keyword == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= copied  # every shipped package is in the image


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".marn", "data", ".git"} <= ignored
    copied = {args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "COPY"}
    assert not copied & ignored, "the Dockerfile copies something .dockerignore drops"


def test_image_tag_matches_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert project_image().endswith(f":{version}")
