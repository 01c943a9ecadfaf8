"""Typed configuration of a track, loaded from `configs/*.yaml`.

Every size, limit and switch the services use is a named field here; services and the gateway read it, never
literals. Which file is loaded, and a few per-deployment overrides, come from the environment:

- `HCX_CONFIG`: path of the track config (default: the track's embedded default, `configs/track_<t>.embedded.yaml`).
- `HCX_MODEL_DIR`: the converted component folders (`llm/`, `ve/`, ...), overriding `model_dir`.
- `HCX_OVERRIDES`: space-separated `dotted.key=value` pairs (values parsed as YAML), e.g.
  `media.allow_private_networks=true llm.max_model_len=4096`.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMConfig(_Section):
    """The vLLM engine behind the LLM service (an OpenAI server on `port`, proxied by BentoML)."""

    served_model_name: str
    aliases: list[str] = Field(default_factory=list, description="Other names clients may send as `model`.")
    tensor_parallel_size: PositiveInt = 1
    dtype: str = "auto"
    max_model_len: PositiveInt = 32768
    max_num_seqs: PositiveInt | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    port: int = 8000
    chat_template: str = "configs/chat_templates/track_a.jinja"
    reasoning_parser: str = "deepseek_v3"
    tool_call_parser: str | None = Field(
        "glm45", description="vLLM tool parser for the template's <tool_call> format."
    )
    reasoning_start: str = "<think>"
    reasoning_end: str = "</think>"
    architecture: str | None = Field(
        None, description="vLLM model class to serve the checkpoint with (`--hf-overrides architectures`)."
    )
    modalities: list[Literal["image", "video", "audio"]] = Field(
        default_factory=lambda: ["image", "video"], description="Precomputed embeddings the LLM accepts."
    )
    reasoning_by_default: bool = Field(
        False, description="Reason unless the request opts out (track B); otherwise only when it opts in (track A)."
    )
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the vLLM process.")
    gpu_type: str | None = None
    timeout_s: PositiveFloat = 600.0
    startup_timeout_s: PositiveFloat = 1800.0


class VisionEncoderConfig(_Section):
    """The Qwen2.5-VL vision tower service."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    max_batch_size: PositiveInt = 16
    max_latency_ms: PositiveInt = Field(
        10000, description="BentoML answers 503 to calls it cannot finish within this; the batching window is learned."
    )
    threads: PositiveInt | None = Field(None, description="torch intra-op threads on CPU (None: torch default).")
    gpus: PositiveInt = 1
    gpu_type: str | None = None
    timeout_s: PositiveFloat = 120.0


class MediaConfig(_Section):
    """Limits on what clients may send, enforced in the gateway before any model sees it."""

    max_images_per_request: PositiveInt = 8
    max_image_bytes: PositiveInt = 20 * 1024 * 1024
    max_image_pixels: PositiveInt = 50_000_000
    min_image_side: PositiveInt = 4
    max_videos_per_request: PositiveInt = 2
    max_video_bytes: PositiveInt = 200 * 1024 * 1024
    max_video_seconds: PositiveFloat = 600.0
    max_video_frames_given: PositiveInt = Field(256, description="Longest list-of-frames video a client may send.")
    video_fps: PositiveFloat = Field(2.0, description="Frames sampled per second of video (clients may ask less).")
    video_min_frames: PositiveInt = 4
    video_max_frames: PositiveInt = 170
    video_max_pixels: PositiveInt = Field(378 * 378, description="Pixel budget per frame (clients may ask less).")
    max_audios_per_request: PositiveInt = 4
    max_audio_bytes: PositiveInt = 25 * 1024 * 1024
    max_audio_seconds: PositiveFloat = Field(600.0, description="Longest audio clip accepted (after decoding).")
    audio_formats: list[str] = Field(
        default_factory=lambda: ["wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm", "mp4"],
        description="`input_audio.format` values accepted (mp4/webm: the sound track of a video file).",
    )
    fetch_timeout_s: PositiveFloat = 15.0
    max_redirects: int = Field(3, ge=0)
    allow_private_networks: bool = Field(
        False, description="Let image URLs point at loopback/private/link-local addresses (SSRF guard off)."
    )


class AudioEncoderConfig(_Section):
    """Track B's audio encoder service: Qwen2-Audio encoder + projector and the CosyVoice tokenizer."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    max_batch_size: PositiveInt = 16
    max_latency_ms: PositiveInt = 10000
    threads: PositiveInt | None = None
    gpus: PositiveInt = 1
    gpu_type: str | None = None
    timeout_s: PositiveFloat = 120.0


class GatewayConfig(_Section):
    route_prefixes: list[str] = Field(default_factory=lambda: ["/v1"])
    max_n: PositiveInt = 8
    default_max_tokens: PositiveInt | None = None
    timeout_s: PositiveFloat = 900.0


class TrackConfig(_Section):
    track: Literal["a", "b"]
    model_dir: Path = Field(description="Folder holding the converted components (llm/, ve/, ...).")
    llm: LLMConfig
    vision_encoder: VisionEncoderConfig = Field(default_factory=VisionEncoderConfig)
    audio_encoder: AudioEncoderConfig | None = Field(None, description="Track B only.")
    media: MediaConfig = Field(default_factory=MediaConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    def component_dir(self, name: str) -> Path:
        return self.model_dir / name

    def resolve(self, path: str | Path) -> Path:
        """Paths in config files are relative to the project root."""
        p = Path(path)
        return p if p.is_absolute() else PROJECT_ROOT / p


def default_config_path(track: str) -> Path:
    return CONFIG_DIR / f"track_{track}.embedded.yaml"


def _apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_track_config(track: str, path: str | Path | None = None, env: dict[str, str] | None = None) -> TrackConfig:
    env = dict(os.environ if env is None else env)
    path = Path(path or env.get("HCX_CONFIG") or default_config_path(track))
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    data = yaml.safe_load(path.read_text()) or {}
    if env.get("HCX_MODEL_DIR"):
        data["model_dir"] = env["HCX_MODEL_DIR"]
    for item in shlex.split(env.get("HCX_OVERRIDES", "")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"HCX_OVERRIDES entry {item!r} is not key=value")
        _apply_override(data, key, yaml.safe_load(raw))
    config = TrackConfig.model_validate(data)
    if config.track != track:
        raise ValueError(f"{path} configures track {config.track!r}, expected {track!r}")
    if not config.model_dir.is_absolute():
        config.model_dir = PROJECT_ROOT / config.model_dir
    return config
