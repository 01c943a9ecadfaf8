"""`make build`: `bentoml build` of the track A and track B bentos (bentofile.yaml, bentofile.track_b.yaml; no docker
needed), each with its GPU config."""

import os
import subprocess

import pytest
import yaml

from hcxserve.config import PROJECT_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "1"}
    result = subprocess.run(
        ["make", "--no-print-directory", "build"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return home / "bentos"


def bento_of(built, name):
    (bento_dir,) = [p for p in (built / name).iterdir() if p.is_dir()]
    return bento_dir, yaml.safe_load((bento_dir / "bento.yaml").read_text())


def test_build_track_a_bento(built):
    bento_dir, bento = bento_of(built, "hcx-track-a")
    services = {s["name"]: s for s in bento["services"]}
    assert bento["entry_service"] == "TrackAGateway"
    assert set(services) == {"TrackAGateway", "LLM", "VisionEncoder"}
    # built with the GPU config: the 32B LLM takes two GPUs (tensor parallel), the encoder one
    assert services["LLM"]["config"]["resources"]["gpu"] == 2
    assert services["VisionEncoder"]["config"]["resources"]["gpu"] == 1
    assert {d["service"] for d in services["TrackAGateway"]["dependencies"]} == {"LLM", "VisionEncoder"}
    assert {"/v1/chat/completions", "/a/v1/chat/completions", "/v1/models"} <= set(bento["schema"]["paths"])
    src = bento_dir / "src"
    for path in (
        "bentos/track_a.py",
        "services/gateway.py",
        "hcxserve/vllm_plugin.py",
        "configs/track_a.yaml",
        "configs/chat_templates/track_a.jinja",
        "convert_model.py",
    ):
        assert (src / path).is_file(), path
    assert not (src / "models").exists() and not (src / "tests").exists()
    assert list((bento_dir / "env" / "python" / "wheels").glob("hcxserve-*.whl"))
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "vllm==0.32.0" in requirements
    assert (bento_dir / "env" / "docker" / "Dockerfile").is_file()


def test_build_track_b_bento(built):
    bento_dir, bento = bento_of(built, "hcx-track-b")
    services = {s["name"]: s for s in bento["services"]}
    assert bento["entry_service"] == "TrackBGateway"
    assert set(services) == {"TrackBGateway", "LLM", "VisionEncoder", "AudioEncoder"}
    # one GPU per component, as OmniServe's Omni layout
    assert [services[name]["config"]["resources"]["gpu"] for name in ("LLM", "VisionEncoder", "AudioEncoder")] == [
        1,
        1,
        1,
    ]
    assert {d["service"] for d in services["TrackBGateway"]["dependencies"]} == {
        "LLM",
        "VisionEncoder",
        "AudioEncoder",
    }
    assert {"/v1/chat/completions", "/b/v1/chat/completions"} <= set(bento["schema"]["paths"])
    assert (bento_dir / "src" / "configs" / "track_b.yaml").is_file()
    assert (bento_dir / "src" / "hcxserve" / "vllm_omni.py").is_file()
    assert any(e["name"] == "HCX_CONFIG" and e["value"] == "configs/track_b.yaml" for e in bento["envs"])
