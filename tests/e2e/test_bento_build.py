"""`bentoml build` of the track A bento from bentofile.yaml (no docker needed)."""

import os
import subprocess

import pytest
import yaml

from hcxserve.config import PROJECT_ROOT

pytestmark = pytest.mark.e2e


def test_build_track_a_bento(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "1"}
    result = subprocess.run(
        ["make", "--no-print-directory", "build"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (bento_dir,) = [p for p in (tmp_path / "bentoml" / "bentos" / "hcx-track-a").iterdir() if p.is_dir()]
    bento = yaml.safe_load((bento_dir / "bento.yaml").read_text())
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
