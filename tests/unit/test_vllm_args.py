import json

from hcxserve.config import load_track_config
from hcxserve.vllm_args import vllm_server_command


def option(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_embedded_default_command():
    config = load_track_config("a", env={})
    cmd = vllm_server_command(config)
    assert option(cmd, "--model") == str(config.model_dir / "llm")
    assert option(cmd, "--host") == "127.0.0.1"  # only the LLM service's proxy reaches it
    assert json.loads(option(cmd, "--limit-mm-per-prompt")) == {"image": 0, "video": 0}
    assert "--hf-overrides" not in cmd
    assert "--enable-mm-embeds" in cmd and "--enforce-eager" in cmd
    assert option(cmd, "--reasoning-parser") == "deepseek_v3"
    assert json.loads(option(cmd, "--reasoning-config"))["reasoning_end_str"] == "</think>"
    assert option(cmd, "--tool-call-parser") == "glm45" and "--enable-auto-tool-choice" in cmd
    assert option(cmd, "--chat-template-content-format") == "openai"


def test_gpu_config_and_whole_vlm_baseline():
    config = load_track_config("a", path="configs/track_a.yaml", env={"HCX_MODEL_DIR": "/data/think32b"})
    cmd = vllm_server_command(config)
    assert option(cmd, "--tensor-parallel-size") == "2" and option(cmd, "--dtype") == "bfloat16"
    assert option(cmd, "--model") == "/data/think32b/llm" and "--enforce-eager" not in cmd
    whole = vllm_server_command(config, model="/data/unified", embeds_only=False)
    assert "--enable-mm-embeds" not in whole and option(whole, "--model") == "/data/unified"


def test_overrides_from_the_environment():
    config = load_track_config("a", env={"HCX_OVERRIDES": "llm.max_model_len=1024 media.allow_private_networks=true"})
    assert config.llm.max_model_len == 1024 and config.media.allow_private_networks is True


def test_track_b_serves_the_omni_class_with_audio():
    config = load_track_config("b", env={})
    cmd = vllm_server_command(config)
    assert json.loads(option(cmd, "--hf-overrides")) == {"architectures": ["HCXOmniForCausalLM"]}
    assert json.loads(option(cmd, "--limit-mm-per-prompt")) == {"image": 0, "video": 0, "audio": 0}
    assert option(cmd, "--chat-template").endswith("track_b.jinja")
    assert config.llm.reasoning_by_default and config.gateway.route_prefixes[0] == "/b/v1"
