"""Versions are written once, in pyproject.toml; the CPU lock must agree with it, and the wheel is the runtime."""

from __future__ import annotations

import re
import tomllib

from hcxserve.config import PROJECT_ROOT


def pinned(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            out[match.group(1).lower().replace("_", "-")] = match.group(2)
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
