"""Typed configuration of a deployment: which tracks it serves, and each track's model, components and limits.

Every size, limit and switch the services use is a named field here; code reads it, never literals. A track is
data: its YAML names its route prefixes, its LLM and the components that encode its media (`components:`), and
the gateway and services are built from that declaration.

Where values come from, later winning over earlier:
1. `configs/tracks/<track>.yaml`: the track on its real checkpoint, one GPU per component.
2. The profiles in `HCX_PROFILE` (or the bento's `profile` argument), in order: `configs/profiles/<name>.yaml`
   overlays, e.g. `embedded` (the small default models on a CPU, the default), `single_gpu` (every component on
   one shared GPU).
3. Environment variables, through pydantic-settings: `HCX_` + the field path joined by `__`, e.g.
   `HCX_TRACKS__A__MODEL_DIR=/models/think32b`, `HCX_TRACKS__B__LLM__MAX_MODEL_LEN=8192`,
   `HCX_DEFAULT_TRACK=b`. Secrets (API keys, storage credentials) come the same way, never from files in the repo.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
TRACKS = ("a", "b")
Track = Literal["a", "b"]
Modality = Literal["image", "video", "audio"]


def _comma_list(value: Any) -> Any:
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentConfig(_Section):
    """Placement and traffic of one component service."""

    gpus: PositiveFloat = Field(
        1, description="GPUs of the service; a fraction (0.125) shares one GPU with the components of the same share."
    )
    gpu_type: str | None = Field(None, description="BentoCloud instance hint, e.g. nvidia-h100-80gb.")
    timeout_s: PositiveFloat = 120.0

    @field_validator("gpus")
    @classmethod
    def _whole_or_a_share(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("more than one GPU must be a whole number")
        return value

    def resources(self) -> dict[str, Any]:
        """`@bentoml.service(resources=...)`."""
        gpus = int(self.gpus) if self.gpus == int(self.gpus) else self.gpus
        return {"gpu": gpus, **({"gpu_type": self.gpu_type} if self.gpu_type else {})}


class TorchComponentConfig(ComponentConfig):
    """A batched torch model service (an encoder or a decoder)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    max_batch_size: PositiveInt = 16
    max_latency_ms: PositiveInt = Field(
        10000, description="BentoML answers 503 to calls it cannot finish within this; the batching window is learned."
    )
    threads: PositiveInt | None = Field(None, description="torch intra-op threads on CPU (None: torch default).")
    keep_freed_memory: bool = Field(
        True,
        description="Keep memory a batch freed for the next one rather than give it back to the kernel (faster "
        "batches; RSS stays at its high-water mark); see hcxserve.models.keep_freed_memory.",
    )


class EncoderConfig(TorchComponentConfig):
    """A batched torch encoder service (vision or audio)."""

    cache_bytes: int = Field(
        1 << 30,
        ge=0,
        description="The gateway's cache of this component's results, by content, in bytes per gateway worker "
        "(0: off); see hcxserve.gateway.encoder_cache.",
    )
    item_threads: PositiveInt | None = Field(
        None,
        description="Threads that decode and preprocess a batch's items, and serialise its results, side by side "
        "(None: one per CPU core of the process, at most max_batch_size; 1: one item after another).",
    )


class VisionEncoderConfig(EncoderConfig):
    """The Qwen2.5-VL vision tower (+ on track B its projector and TA-Tok), reading `ve/`."""

    folder: str = "ve"


class AudioEncoderConfig(EncoderConfig):
    """Track B's Qwen2-Audio encoder + projector and CosyVoice tokenizer, reading `ae/`."""

    folder: str = "ae"


class AudioDecoderConfig(TorchComponentConfig):
    """Track B's unit vocoder (BigVGAN), reading `ad/finetuned` (named voices) and `ad/zeroshot` (a reference clip's
    voice)."""

    folder: str = "ad"
    default_voice: str = Field("fkms", description="The finetuned speaker used when a request names none.")
    max_units: PositiveInt = Field(2000, description="Most units one request may have decoded (80 s at 25 units/s).")
    max_reference_seconds: PositiveFloat = Field(30.0, description="Longest reference clip for a zero-shot voice.")
    stream_first_units: PositiveInt = Field(
        5, description="Units a streamed answer's first audio waits for (0.2 s of speech: its latency)."
    )
    stream_units: PositiveInt = Field(25, description="Units each later part of a streamed answer waits for (1 s).")


class VisionDecoderConfig(TorchComponentConfig):
    """Track B's image decoder (token embedder + DiT + VAE), reading `vd/`."""

    folder: str = "vd"
    steps: PositiveInt = Field(50, description="Denoising steps when a request names none.")
    max_steps: PositiveInt = 200
    guidance_scale: float = Field(0.75, ge=0, le=10, description="Autoguidance scale when a request names none.")


class ComponentsConfig(_Section):
    """The components that encode a track's media and decode what its LLM draws, each its own service (and GPU in
    production)."""

    vision_encoder: VisionEncoderConfig | None = None
    audio_encoder: AudioEncoderConfig | None = None
    audio_decoder: AudioDecoderConfig | None = None
    vision_decoder: VisionDecoderConfig | None = None


# a component kind's part of its service's name (`TrackConfig.service_name`)
SERVICE_NAMES = {
    "llm": "LLM",
    "vision_encoder": "VisionEncoder",
    "audio_encoder": "AudioEncoder",
    "audio_decoder": "AudioDecoder",
    "vision_decoder": "VisionDecoder",
}

# which component encodes each modality
MODALITY_COMPONENT: dict[str, str] = {"image": "vision_encoder", "video": "vision_encoder", "audio": "audio_encoder"}


class LLMConfig(ComponentConfig):
    """The vLLM engine behind the LLM service (an OpenAI server on `port`, proxied by BentoML)."""

    gpus: PositiveFloat | None = Field(None, description="Default: tensor_parallel_size; a share when < 1.")
    served_model_name: str
    aliases: list[str] = Field(default_factory=list, description="Other names clients may send as `model`.")
    tensor_parallel_size: PositiveInt = 1
    dtype: str = "auto"
    max_model_len: PositiveInt = 32768
    max_num_seqs: PositiveInt | None = None
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of the GPU's memory this engine takes (weights + KV cache)."
    )
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    port: int = 8000
    chat_template: str = "configs/chat_templates/track_a.jinja"
    reasoning_parser: str = "deepseek_v3"
    tool_call_parser: str | None = Field("glm45", description="vLLM tool parser for the template's <tool_call> format.")
    reasoning_start: str = "<think>"
    reasoning_end: str = "</think>"
    architecture: str | None = Field(
        None, description="vLLM model class to serve the checkpoint with (`--hf-overrides architectures`)."
    )
    modalities: list[Modality] = Field(
        default_factory=lambda: ["image", "video"], description="Precomputed embeddings the LLM accepts."
    )
    reasoning_by_default: bool = Field(
        False, description="Reason unless the request opts out (track B); otherwise only when it opts in (track A)."
    )
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the vLLM process.")
    timeout_s: PositiveFloat = 600.0
    startup_timeout_s: PositiveFloat = 1800.0
    shutdown_timeout_s: int = Field(
        30, ge=0, description="On SIGTERM/SIGINT, how long vLLM finishes running requests before it aborts them."
    )
    max_restarts: int = Field(
        5,
        ge=0,
        description="Times vLLM is started again after dying within `restart_window_s` before the service "
        "gives up (its liveness then fails and the platform restarts it); see hcxserve.llm.supervisor.",
    )
    restart_window_s: PositiveFloat = 600.0

    @model_validator(mode="after")
    def _gpus(self) -> LLMConfig:
        if self.gpus is None:
            self.gpus = float(self.tensor_parallel_size)
        elif self.gpus < 1 and self.tensor_parallel_size > 1:
            raise ValueError("tensor parallelism needs whole GPUs")
        return self


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
    video_sound: bool = Field(
        True,
        description="Hear a video file's sound track as well as see it, on tracks that take audio (a video part's "
        "`sound: false` turns it off for that video).",
    )
    max_image_aspect_ratio: PositiveFloat = Field(200.0, description="Longest side over shortest (the ViT's bound).")
    min_audio_seconds: PositiveFloat = Field(0.1, description="Shortest clip (the encoder makes a row per 40 ms).")
    allow_remote_media: bool = Field(True, description="Fetch http(s) media URLs at all (off: inline data only).")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="When set, the only hosts media URLs may name (`example.com`, `*.example.com`); their "
        "addresses must still be public.",
    )
    allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs media URLs may reach even though they are not public (an operator's own storage).",
    )
    fetch_timeout_s: PositiveFloat = Field(15.0, description="Connect and per-read timeout of a fetch.")
    fetch_deadline_s: PositiveFloat = Field(30.0, description="Total time one fetch may take, redirects included.")
    media_deadline_s: PositiveFloat = Field(60.0, description="Total time fetching one request's media may take.")
    max_concurrent_fetches: PositiveInt = Field(8, description="Downloads in flight at once for one request.")
    max_redirects: int = Field(3, ge=0)
    url_cache_bytes: int = Field(
        128 * 1024 * 1024,
        ge=0,
        description="Bytes of media downloaded from URLs that each gateway worker keeps, per track, as HTTP caching "
        "headers allow (revalidated with ETag/Last-Modified, or fresh for max-age); 0 turns it off.",
    )
    allow_private_networks: bool = Field(
        False, description="Let media URLs point at loopback/private/link-local addresses (SSRF guard off)."
    )

    _lists = field_validator("allowed_hosts", "allowed_networks", mode="before")(_comma_list)

    @field_validator("allowed_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad entry
        return value

    def max_inline_bytes(self) -> int:
        """The most media bytes one request may carry inline (base64 inflates them by 4/3)."""
        media = (
            self.max_images_per_request * self.max_image_bytes
            + self.max_videos_per_request * self.max_video_bytes
            + self.max_audios_per_request * self.max_audio_bytes
        )
        return media * 4 // 3


class TrackConfig(_Section):
    """One track: its model folder, route prefixes, LLM, media components and limits."""

    track: Track
    model_dir: Path = Field(description="Folder holding the converted components (llm/, ve/, ...).")
    routes: list[str] = Field(description="Route prefixes of its OpenAI API, e.g. /a/v1.")
    llm: LLMConfig
    components: ComponentsConfig = Field(default_factory=ComponentsConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)

    @field_validator("model_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value if value.is_absolute() else PROJECT_ROOT / value

    @model_validator(mode="after")
    def _every_modality_has_its_encoder(self) -> TrackConfig:
        for modality in self.llm.modalities:
            if getattr(self.components, MODALITY_COMPONENT[modality]) is None:
                raise ValueError(
                    f"track {self.track}: the LLM takes {modality} but no components.{MODALITY_COMPONENT[modality]} "
                    "is configured"
                )
        return self

    @property
    def name(self) -> str:
        """`TrackA`: the prefix of its services' names."""
        return f"Track{self.track.upper()}"

    def service_name(self, kind: str) -> str:
        """The BentoML service of one of its components: `TrackA-LLM`, `TrackB-AudioEncoder`, ..."""
        return f"{self.name}-{SERVICE_NAMES[kind]}"

    def component_dir(self, folder: str) -> Path:
        return self.model_dir / folder

    def resolve(self, path: str | Path) -> Path:
        """Paths in config files are relative to the project root."""
        p = Path(path)
        return p if p.is_absolute() else PROJECT_ROOT / p

    def components_by_kind(self) -> dict[str, TorchComponentConfig]:
        """Every configured component but the LLM, by kind (`vision_encoder`, ..., `vision_decoder`)."""
        return {kind: cfg for kind in ComponentsConfig.model_fields if (cfg := getattr(self.components, kind))}

    def encoders(self) -> dict[str, EncoderConfig]:
        """The configured encoder components by kind (`vision_encoder`, `audio_encoder`)."""
        return {kind: cfg for kind, cfg in self.components_by_kind().items() if isinstance(cfg, EncoderConfig)}


class RequestLimits(_Section):
    """Bounds on a chat request, each refused with a 400 naming its parameter. (Media limits: `MediaConfig`;
    `max_tokens` and `thinking_token_budget` are bounded by the track's `max_model_len`.)"""

    max_n: PositiveInt = 8
    max_total_tokens: PositiveInt = Field(131072, description="Ceiling of n x max_tokens (tokens one request may ask).")
    max_messages: PositiveInt = 1024
    max_text_chars: PositiveInt = Field(2_000_000, description="Characters of text over all messages.")
    max_stop_sequences: PositiveInt = 16
    max_stop_chars: PositiveInt = 256
    max_tools: PositiveInt = 128
    max_schema_bytes: PositiveInt = Field(65536, description="JSON size of `tools`, and of `response_format`.")
    max_top_k: PositiveInt = 4096
    max_json_depth: PositiveInt = Field(64, description="Nesting of the request body's JSON.")


class AuthConfig(_Section):
    """API keys of the gateway. Keys come from the environment (`HCX_AUTH__API_KEYS=k1,k2`, several for rotation)
    or a file (`HCX_AUTH__API_KEYS_FILE`, one per line, e.g. a mounted secret); never from files in the repo."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    allow_unauthenticated: bool = Field(
        False, description="Serve without keys when none are configured (local use only; logged as a warning)."
    )

    _split = field_validator("api_keys", mode="before")(_comma_list)

    def keys(self) -> list[str]:
        """Every accepted key: the configured ones and the file's lines (blank lines and `#` comments skipped)."""
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return keys


class StorageConfig(_Section):
    """Where the gateway keeps the media it generates (images, speech) for clients to fetch by URL; see
    hcxserve.gateway.storage. Credentials come from the environment (`HCX_GATEWAY__STORAGE__ACCESS_KEY_ID`,
    `HCX_GATEWAY__STORAGE__SECRET_ACCESS_KEY`) or boto3's default chain, never from files in the repo."""

    backend: Literal["inline", "s3"] = Field(
        "inline", description="inline: the media in the answer as a data: URL; s3: uploaded, answered by a URL."
    )
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2, ...); None: AWS S3.")
    public_endpoint_url: str | None = Field(
        None,
        description="Endpoint written into presigned URLs when clients reach the store by another address than "
        "the gateway (None: endpoint_url).",
    )
    region: str | None = Field(None, description="Region the URLs are signed for (None: boto3's default).")
    bucket: str | None = Field(None, description="Bucket the media go to (required by the s3 backend).")
    access_key_id: SecretStr | None = Field(
        None, description="None (with secret_access_key): boto3's default credential chain."
    )
    secret_access_key: SecretStr | None = Field(
        None,
        description="None (with access_key_id): boto3's default credential chain, e.g. AWS_* environment "
        "variables or an instance role.",
    )
    prefix: str = Field("generated", description="Key prefix; keys are <prefix>/YYYY/MM/DD/<uuid><suffix>.")
    url_expiry_s: PositiveInt = Field(3600, description="Lifetime of a presigned URL, in seconds.")
    timeout_s: PositiveFloat = Field(10.0, description="Connect and read timeout of one store call.")
    audio_as_url: bool = Field(
        False,
        description="Spoken answers as OmniServe gives them: `audio.data` (and `audio.id`) the URL-safe base64 of the "
        "stored file's URL, not the file itself (non-streamed answers).",
    )

    @model_validator(mode="after")
    def _complete(self) -> StorageConfig:
        if self.backend == "s3" and not self.bucket:
            raise ValueError("storage backend s3 needs a bucket")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key are given together, or neither")
        return self


class GatewayConfig(_Section):
    default_max_tokens: PositiveInt | None = None
    timeout_s: PositiveFloat = 900.0
    text_bytes: PositiveInt = Field(8 << 20, description="Request body allowance beyond the inline media limits.")
    max_concurrent_requests: PositiveInt = Field(64, description="Chat requests in progress at once per worker.")
    max_queued_requests: int = Field(
        64, ge=0, description="Chat requests waiting for a slot; beyond them a request gets 429 at once."
    )
    retry_after_s: PositiveInt = Field(1, description="`Retry-After` of a 429.")
    limits: RequestLimits = Field(default_factory=RequestLimits)
    storage: StorageConfig = Field(default_factory=StorageConfig)


class Deployment(BaseSettings):
    """What one bento serves: some tracks behind one gateway, `/v1` belonging to `default_track`."""

    model_config = SettingsConfigDict(env_prefix="HCX_", env_nested_delimiter="__", extra="forbid")

    served: Annotated[list[Track], NoDecode] = Field(description="The tracks this deployment serves, in order.")
    profile: Annotated[list[str], NoDecode] = Field(default_factory=list)
    default_track: Track | None = Field(None, description="Owner of /v1 (default: the first served track).")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tracks: dict[Track, TrackConfig]

    _split = field_validator("served", "profile", mode="before")(_comma_list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the configuration files arrive as init arguments; the environment overrides them
        return env_settings, init_settings

    @model_validator(mode="before")
    @classmethod
    def _served_tracks_only(cls, data: Any) -> Any:
        """Sections of tracks this deployment does not serve (in a shared file or the environment) are ignored."""
        if isinstance(data, dict) and isinstance(data.get("tracks"), dict):
            served = _comma_list(data.get("served") or [])
            data = {**data, "tracks": {k: {**v, "track": k} for k, v in data["tracks"].items() if k in served}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Deployment:
        missing = [t for t in self.served if t not in self.tracks]
        if missing:
            raise ValueError(f"no configuration for track(s) {missing}")
        self.default_track = self.default_track or self.served[0]
        if self.default_track not in self.served:
            raise ValueError(f"default_track {self.default_track!r} is not served ({self.served})")
        routes = [route for t in self.served for route in self.tracks[t].routes]
        if len(routes) != len(set(routes)) or "/v1" in routes:
            raise ValueError(f"route prefixes must be distinct and leave /v1 to the default track: {routes}")
        ports = [self.tracks[t].llm.port for t in self.served]
        if len(ports) != len(set(ports)):
            raise ValueError(f"each track's LLM needs its own port: {ports}")
        return self

    def served_tracks(self) -> list[TrackConfig]:
        return [self.tracks[t] for t in self.served]

    def max_body_bytes(self, track: str | None = None) -> int:
        """The largest request body of `track`'s routes, or of any served track's (`/v1`)."""
        tracks = [self.tracks[track]] if track else self.served_tracks()
        return max(t.media.max_inline_bytes() for t in tracks) + self.gateway.text_bytes


class _ProfileSetting(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HCX_", extra="ignore")

    profile: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["embedded"])
    _split = field_validator("profile", mode="before")(_comma_list)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def dotted_overrides(tracks: list[str] | tuple[str, ...], dotted: dict[str, Any]) -> dict[str, Any]:
    """Nested overrides from dotted keys: `media.max_images_per_request` applies to every track, `a.llm.port` to one,
    `gateway.*` and `default_track` to the deployment."""
    data: dict[str, Any] = {}
    for key, value in dotted.items():
        path = key.split(".")
        if path[0] in ("gateway", "default_track", "auth"):
            paths = [path]
        elif path[0] in TRACKS:
            paths = [["tracks", *path]]
        else:
            paths = [["tracks", track, *path] for track in tracks]
        for full in paths:
            node = data
            for part in full[:-1]:
                node = node.setdefault(part, {})
            node[full[-1]] = value
    return data


def load_deployment(
    tracks: list[str] | tuple[str, ...],
    *,
    profile: list[str] | str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Deployment:
    """The deployment serving `tracks`: track files, then profile overlays, then `overrides` (tests, tools), then
    the environment. `profile` defaults to `HCX_PROFILE` (itself defaulting to `embedded`)."""
    profiles = _comma_list(profile) if profile is not None else _ProfileSetting().profile
    data: dict[str, Any] = {"tracks": {t: _read_yaml(CONFIG_DIR / "tracks" / f"{t}.yaml") for t in tracks}}
    for name in profiles:
        path = CONFIG_DIR / "profiles" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))
            raise ValueError(f"unknown profile {name!r} (known: {', '.join(known)})")
        data = deep_merge(data, _read_yaml(path))
    data = deep_merge(data, overrides or {})
    return Deployment(served=list(tracks), profile=profiles, **data)


def load_track(track: str, **kwargs: Any) -> TrackConfig:
    """One track's configuration as a deployment serving it alone would have it."""
    return load_deployment([track], **kwargs).tracks[track]
