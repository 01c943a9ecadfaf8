"""`make build` from this tree: the three bentos (both tracks, track A, track B; no docker needed), each with the GPU
profile, what their images install (the project's wheel, which pins the GPU stack and registers the vLLM plugin), the
Dockerfile BentoML generates for `bentoml containerize`, and the BentoCloud deployment configs that go with them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from hcxserve.config import PROJECT_ROOT

pytestmark = pytest.mark.e2e

LLM_GPUS = {"TrackA-LLM": 2, "TrackB-LLM": 1}  # 32B in bf16 on two 80 GB cards; 8B on one
BENTOS = {
    "hcx": (
        "bentos/combined.py",
        ["TrackA-LLM", "TrackA-VisionEncoder", "TrackB-AudioDecoder", "TrackB-AudioEncoder", "TrackB-LLM",
         "TrackB-VisionDecoder", "TrackB-VisionEncoder"],
        ["/a/v1", "/b/v1"],
    ),
    "hcx-track-a": ("bentos/track_a.py", ["TrackA-LLM", "TrackA-VisionEncoder"], ["/a/v1"]),
    "hcx-track-b": (
        "bentos/track_b.py",
        ["TrackB-AudioDecoder", "TrackB-AudioEncoder", "TrackB-LLM", "TrackB-VisionDecoder", "TrackB-VisionEncoder"],
        ["/b/v1"],
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1"}
    result = subprocess.run(
        ["make", "--no-print-directory", "build"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return home


def bento_of(home: Path, name: str) -> tuple[Path, dict]:
    (bento_dir,) = [p for p in (home / "bentos" / name).iterdir() if p.is_dir()]
    return bento_dir, yaml.safe_load((bento_dir / "bento.yaml").read_text())


@pytest.mark.parametrize("name", BENTOS)
def test_bento(home, name):
    module, components, routes = BENTOS[name]
    bento_dir, bento = bento_of(home, name)
    services = {s["name"]: s for s in bento["services"]}
    assert bento["entry_service"] == "Gateway" and bento["args"] == {"profile": "gpu"}
    assert set(services) == {"Gateway", *components}
    assert sorted(d["service"] for d in services["Gateway"]["dependencies"]) == components
    for component in components:  # one GPU per component, the LLMs tensor parallel where configured
        assert services[component]["config"]["resources"] == {
            "gpu": LLM_GPUS.get(component, 1),
            "gpu_type": "nvidia-h100-80gb",
        }
    assert "resources" not in services["Gateway"]["config"]
    paths = set(bento["schema"]["paths"])
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= paths
    assert {f"{route}/chat/completions" for route in routes} <= paths
    assert bento["labels"]["openai_endpoint"] == "/v1"

    src = bento_dir / "src"
    for path in (module, "services/gateway.py", "hcxserve/llm/plugin.py", "hcxserve/models/vision_tower.py",
                 "configs/tracks/a.yaml", "configs/tracks/b.yaml", "configs/profiles/gpu.yaml",
                 "configs/chat_templates/track_b.jinja", "convert_model.py"):  # fmt: skip
        assert (src / path).is_file(), path
    for absent in ("models", "tests", "benchmarks", "mutants", "hcxserve/tooling", ".venv"):
        assert not (src / absent).exists(), absent


@pytest.mark.parametrize("name", BENTOS)
def test_image_installs_the_pinned_gpu_stack_through_the_projects_wheel(home, name):
    bento_dir, _ = bento_of(home, name)
    python = bento_dir / "env" / "python"
    (wheel,) = (python / "wheels").glob("hcxserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    requires = {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")}
    assert {"vllm==0.32.0", "torch==2.13.0", "bentoml==1.4.39", "pydantic-settings==2.16.3"} <= requires
    assert "hcx_embeds = hcxserve.llm.plugin:register" in entry_points  # loaded by every vLLM process
    assert not [n for n in names if "/tooling/" in n or n.startswith(("tests/", "models/"))]
    # the image installs the requirements, then the wheels with their dependencies
    install = (python / "install.sh").read_text()
    assert "wheels=($WHEELS_DIR/*.whl)" in install and 'pip_install "${PIP_ARGS[@]}" "${wheels[@]}"' in install
    assert (python / "version.txt").read_text().strip().startswith("3.11")


@pytest.mark.parametrize("name", BENTOS)
def test_containerfile(home, name, tmp_path):
    """The Dockerfile `bentoml containerize` would build, generated without a docker daemon."""
    bento_dir, bento = bento_of(home, name)
    script = "import bentoml, sys; bentoml.container.get_containerfile(sys.argv[1], output_path=sys.argv[2])"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1"}
    out = tmp_path / "Dockerfile"
    subprocess.run(
        [sys.executable, "-c", script, f"{name}:{bento['version']}", str(out)], env=env, check=True, timeout=120
    )
    dockerfile = out.read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "uv venv -p 3.11 /app/.venv" in dockerfile
    assert "env/python/install.sh" in dockerfile  # installs the wheel and, with it, vllm 0.32.0 and CUDA torch
    assert "ENV HF_HUB_OFFLINE=$HF_HUB_OFFLINE" in dockerfile
    assert "models/" not in dockerfile


@pytest.mark.parametrize("name", BENTOS)
def test_bentocloud_deployment_config(home, name):
    """deploy/<bento>.yaml as BentoCloud's own schema reads it: every service of the bento gets an instance type and
    scaling, weights come from a mounted folder named in the environment, secrets by name only."""
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    _, bento = bento_of(home, name)
    config = yaml.safe_load((PROJECT_ROOT / "deploy" / f"{name}.yaml").read_text())
    schema = bentoml_cattr.structure({**config, "bento": config["bento"]}, CreateDeploymentSchema)
    assert schema.bento == f"{name}:latest" and schema.name == name
    assert set(schema.services) == {s["name"] for s in bento["services"]}
    for service_name, service in schema.services.items():
        assert service.instance_type and service.scaling.min_replicas >= 0 < service.scaling.max_replicas
        if service_name != "Gateway":
            assert service.instance_type.startswith("gpu.")
    envs = {env.name: env.value for env in schema.envs}
    for track in ("a", "b"):
        if any(s.startswith(f"Track{track.upper()}-") for s in schema.services):
            assert envs[f"HCX_TRACKS__{track.upper()}__MODEL_DIR"].startswith("/models/")
    assert schema.secrets and all(isinstance(s, str) for s in schema.secrets)
