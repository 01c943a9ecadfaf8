"""A deployment's configuration: track files, profile overlays, the environment (pydantic-settings), and the vLLM
command a track's LLM is started with."""

from __future__ import annotations

import json

import pydantic
import pytest

from hcxserve.config import load_deployment, load_track
from hcxserve.llm.args import vllm_server_command


def option(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_embedded_default_command():
    track = load_track("a", profile="embedded")
    cmd = vllm_server_command(track)
    assert option(cmd, "--model") == str(track.model_dir / "llm")
    assert track.model_dir.parts[-2:] == ("embedded", "track_a")
    assert option(cmd, "--host") == "127.0.0.1"  # only the LLM service's proxy reaches it
    assert json.loads(option(cmd, "--limit-mm-per-prompt")) == {"image": 0, "video": 0}
    assert "--hf-overrides" not in cmd
    assert "--enable-mm-embeds" in cmd and "--enforce-eager" in cmd
    assert option(cmd, "--reasoning-parser") == "deepseek_v3"
    assert json.loads(option(cmd, "--reasoning-config"))["reasoning_end_str"] == "</think>"
    assert option(cmd, "--tool-call-parser") == "glm45" and "--enable-auto-tool-choice" in cmd
    assert option(cmd, "--chat-template-content-format") == "openai"
    assert option(cmd, "--tensor-parallel-size") == "1" and option(cmd, "--dtype") == "float32"


def test_gpu_profile_and_whole_vlm_baseline(monkeypatch):
    monkeypatch.setenv("HCX_TRACKS__A__MODEL_DIR", "/data/think32b")
    track = load_track("a", profile="gpu")
    cmd = vllm_server_command(track)
    assert option(cmd, "--tensor-parallel-size") == "2" and option(cmd, "--dtype") == "bfloat16"
    assert option(cmd, "--model") == "/data/think32b/llm" and "--enforce-eager" not in cmd
    assert track.llm.resources() == {"gpu": 2, "gpu_type": "nvidia-h100-80gb"}
    whole = vllm_server_command(track, model="/data/unified", embeds_only=False)
    assert "--enable-mm-embeds" not in whole and option(whole, "--model") == "/data/unified"


def test_track_b_serves_the_omni_class_with_audio():
    track = load_track("b", profile="embedded")
    cmd = vllm_server_command(track)
    assert json.loads(option(cmd, "--hf-overrides")) == {"architectures": ["HCXOmniForCausalLM"]}
    assert json.loads(option(cmd, "--limit-mm-per-prompt")) == {"image": 0, "video": 0, "audio": 0}
    assert option(cmd, "--chat-template").endswith("track_b.jinja")
    assert track.llm.reasoning_by_default and track.routes == ["/b/v1"]
    assert set(track.encoders()) == {"vision_encoder", "audio_encoder"}
    assert set(track.components_by_kind()) == {"vision_encoder", "audio_encoder", "audio_decoder", "vision_decoder"}


def test_the_environment_overrides_files_and_profiles(monkeypatch):
    monkeypatch.setenv("HCX_PROFILE", "gpu")
    monkeypatch.setenv("HCX_TRACKS__B__LLM__MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("HCX_TRACKS__B__MEDIA__ALLOW_PRIVATE_NETWORKS", "true")
    monkeypatch.setenv("HCX_TRACKS__A__LLM__PORT", "9001")  # a track this deployment does not serve: ignored
    deployment = load_deployment(["b"])
    track = deployment.tracks["b"]
    assert deployment.profile == ["gpu"] and track.llm.dtype == "bfloat16"
    assert track.llm.max_model_len == 1024 and track.media.allow_private_networks is True
    assert list(deployment.tracks) == ["b"] and deployment.default_track == "b"


def test_profiles_compose_in_order():
    deployment = load_deployment(["a", "b"], profile="embedded,single_gpu")
    a, b = deployment.tracks["a"], deployment.tracks["b"]
    assert a.llm.dtype == "float32"  # embedded
    components = [c.gpus for c in b.components_by_kind().values()]
    shares = [a.llm.gpus, a.components.vision_encoder.gpus, b.llm.gpus, *components]
    assert shares == [0.125] * 7  # single_gpu: seven equal shares of one GPU
    assert a.llm.resources()["gpu"] == 0.125 and a.llm.tensor_parallel_size == 1
    assert a.llm.gpu_memory_utilization + b.llm.gpu_memory_utilization <= 0.85  # room left for the encoders


def test_combined_deployment_defaults():
    deployment = load_deployment(["a", "b"], profile="embedded")
    assert deployment.default_track == "a" and deployment.served == ["a", "b"]
    assert [t.routes for t in deployment.served_tracks()] == [["/a/v1"], ["/b/v1"]]
    assert deployment.max_body_bytes() == max(t.media.max_inline_bytes() for t in deployment.served_tracks()) + (
        8 << 20
    )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"default_track": "b"}, "default_track 'b' is not served"),
        ({"tracks": {"a": {"routes": ["/v1"]}}}, "leave /v1 to the default track"),
        ({"tracks": {"a": {"llm": {"modalities": ["image", "audio"]}}}}, "no components.audio_encoder"),
        ({"tracks": {"a": {"llm": {"gpus": 1.5}}}}, "whole number"),
        ({"tracks": {"a": {"llm": {"gpus": 0.5, "tensor_parallel_size": 2}}}}, "whole GPUs"),
        ({"tracks": {"a": {"media": {"max_image_bytes": 0}}}}, "greater than 0"),
        ({"tracks": {"a": {"llm": {"unknown_knob": 1}}}}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_configurations_are_refused_at_load(overrides, fragment):
    with pytest.raises(pydantic.ValidationError, match=fragment):
        load_deployment(["a"], profile="embedded", overrides=overrides)


def test_two_tracks_need_distinct_ports_and_routes():
    with pytest.raises(pydantic.ValidationError, match="own port"):
        load_deployment(["a", "b"], profile="embedded", overrides={"tracks": {"b": {"llm": {"port": 8011}}}})
    with pytest.raises(pydantic.ValidationError, match="distinct"):
        load_deployment(["a", "b"], profile="embedded", overrides={"tracks": {"b": {"routes": ["/a/v1"]}}})


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile 'tiny' \\(known: embedded, gpu, single_gpu\\)"):
        load_deployment(["a"], profile="tiny")
