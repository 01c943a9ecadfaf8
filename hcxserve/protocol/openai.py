"""OpenAI chat-completions protocol: requests validated once at the edge, responses and stream chunks.

The request model accepts what OpenAI's SDK and OmniServe's clients send (including a literal `extra_body`
object, which is merged into the top level as the original gateway did). Past validation, code trusts types.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_serializer,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------------------------- content parts
class InlineMedia(str):
    """A large base64 medium left where the request body held it (`hcxserve.gateway.inline_media` cuts it out before
    the body is parsed, so no multi-megabyte str is ever built): `body[start:end]` is the base64 as the client wrote
    it, JSON escapes and all, and `header` its data: URL's header up to the comma ("" for bare base64).

    As a str it is a short stand-in that starts with that header, so whatever reads a reference's header (a
    `data:video/` prefix) reads it as it would the URL; only the fetcher reads the payload."""

    header: str
    body: bytes
    start: int
    end: int

    def __new__(cls, header: str, body: bytes, start: int, end: int) -> InlineMedia:
        self = super().__new__(cls, f"{header}<{end - start} bytes of base64 in the request body>")
        self.header, self.body, self.start, self.end = header, body, start, end
        return self

    @property
    def payload(self) -> memoryview:
        return memoryview(self.body)[self.start : self.end]


def _keep_inline(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    return value if isinstance(value, InlineMedia) else handler(value)


# where a media reference goes: a URL, a data: URL or base64, or the same kept in the body's bytes
MediaSource = Annotated[str, Field(min_length=1), WrapValidator(_keep_inline)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class URLRef(_Strict):
    url: MediaSource
    detail: Literal["auto", "low", "high"] | None = None


def _bare_url(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


# `{"url": ...}` as OpenAI sends it, or a bare URL string as some clients do
URLField = Annotated[URLRef, BeforeValidator(_bare_url)]


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: URLField


class ImagePart(_Strict):
    """`{"type": "image", "image": "<url or data URL>"}` (the Qwen/vLLM form)."""

    type: Literal["image"]
    image: MediaSource


class _VideoOptions(_Strict):
    fps: float | None = Field(None, gt=0, le=30, description="Frames sampled per second (capped by the server).")
    max_pixels: int | None = Field(None, ge=784, description="Pixel budget per frame (capped by the server).")
    sound: bool | None = Field(None, description="Hear the video file's sound track too (None: the server's choice).")


class VideoURLPart(_VideoOptions):
    type: Literal["video_url"]
    video_url: URLField


class VideoPart(_VideoOptions):
    """`{"type": "video", "video": <video URL> | [<frame URL>, ...]}` (the Qwen/vLLM form)."""

    type: Literal["video"]
    video: MediaSource | list[MediaSource] = Field(min_length=1)


class InputAudio(_Strict):
    data: MediaSource
    format: str | None = None


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(_Strict):
    type: Literal["audio_url"]
    audio_url: URLField


ContentPart = Annotated[
    TextPart | ImageURLPart | ImagePart | VideoURLPart | VideoPart | InputAudioPart | AudioURLPart,
    Field(discriminator="type"),
]
IMAGE_PART_TYPES = (ImageURLPart, ImagePart)
VIDEO_PART_TYPES = (VideoURLPart, VideoPart)
AUDIO_PART_TYPES = (InputAudioPart, AudioURLPart)


class AudioRef(_Strict):
    """An earlier spoken answer, referred to by its `audio.id` (OpenAI's multi-turn form)."""

    id: str = Field(min_length=1, max_length=16384)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    audio: AudioRef | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.audio is not None and self.role != "assistant":
            raise ValueError("only an assistant message refers to an earlier spoken answer (`audio`)")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.audio)):
            raise ValueError(f"a {self.role} message needs `content`")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# ---------------------------------------------------------------------------------------------- request
CHAT_TEMPLATE_KWARGS = frozenset({"thinking", "enable_thinking", "skip_reasoning"})


SpeechFormat = Literal["wav", "flac", "ogg", "mp3", "pcm16"]


class AudioOutputOptions(_Strict):
    """OpenAI's `audio` request field: the voice and file format of spoken answers."""

    voice: str | None = Field(None, max_length=64)
    format: SpeechFormat = "wav"


class ImageOutputOptions(_Strict):
    """How generated images are drawn (None: the deployment's defaults; the decoder bounds `steps`)."""

    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=10)
    seed: int | None = Field(None, ge=0, lt=2**63)


IMAGE_TOOL = "t2i_model_generation"  # the Omni model's image tool (OmniServe's name)


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None  # ["text", "audio"]: answer in speech too
    audio: AudioOutputOptions | None = None
    image: ImageOutputOptions | None = None
    is_ref_audio: bool | None = None  # OmniServe's switch: speak in the voice of the last input audio

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    min_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what vLLM's torch generators take
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    user: str | None = None

    stream: bool = False
    stream_options: StreamOptions | None = None

    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(None, ge=0)
    include_reasoning: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _flatten_extra_body(cls, data: Any) -> Any:
        # OmniServe's curl examples send `"extra_body": {...}` literally; its keys override the top level.
        if isinstance(data, dict) and isinstance(data.get("extra_body"), dict):
            data = {**{k: v for k, v in data.items() if k != "extra_body"}, **data["extra_body"]}
        return data

    @field_validator("chat_template_kwargs")
    @classmethod
    def _known_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Other keys would become chat-template variables a client could use to rewrite the prompt framing.
        unknown = sorted(set(value or {}) - CHAT_TEMPLATE_KWARGS)
        if unknown:
            raise ValueError(f"unsupported keys {unknown}; supported: {sorted(CHAT_TEMPLATE_KWARGS)}")
        return value

    def wants_speech(self) -> bool:
        return "audio" in (self.modalities or [])

    def wants_image(self) -> bool:
        """`tool_choice` names the image tool (OpenAI's form, or just the name)."""
        choice = self.tool_choice
        if isinstance(choice, dict):
            function = choice.get("function")
            return isinstance(function, dict) and function.get("name") == IMAGE_TOOL
        return False

    def declares_image_tool(self) -> bool:
        """The request lists the image tool: its images then come back as OmniServe's tool calls too."""
        return any(
            isinstance(tool, dict)
            and isinstance(tool.get("function"), dict)
            and tool["function"].get("name") == IMAGE_TOOL
            for tool in self.tools or []
        )

    def reasoning(self, *, default: bool) -> bool:
        """Whether the model should reason: `thinking`/`enable_thinking` opt in or out explicitly, and
        `skip_reasoning` (OmniServe's track B switch) opts out; otherwise the track's default."""
        kwargs = self.chat_template_kwargs or {}
        if kwargs.get("skip_reasoning"):
            return False
        for key in ("thinking", "enable_thinking"):
            if kwargs.get(key) is not None:
                return bool(kwargs[key])
        return default


# ---------------------------------------------------------------------------------------------- responses
class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AudioOutput(BaseModel):
    """OpenAI's `message.audio`: the spoken answer as a file (base64), and what it says."""

    id: str
    data: str
    expires_at: int
    transcript: str


class AudioDelta(BaseModel):
    """A streamed spoken answer, OpenAI's way: `id` once, `data` chunks (base64 of raw pcm16, or of the whole file
    in another format), then `transcript` and `expires_at` once."""

    id: str | None = None
    data: str | None = None
    transcript: str | None = None
    expires_at: int | None = None


class ImageURL(BaseModel):
    url: str


class ImageOutput(BaseModel):
    """A generated image, as OpenRouter and LiteLLM return them (`message.images`, `delta.images`)."""

    index: int
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    audio: AudioOutput | None = None
    images: list[ImageOutput] | None = None

    @model_serializer(mode="wrap")
    def _media_only_when_made(self, handler) -> dict[str, Any]:
        data = handler(self)
        for key in ("audio", "images"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # served from vLLM's prefix cache (whole blocks), media embeddings included


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    audio: AudioDelta | None = None
    images: list[ImageOutput] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "naver-hyperclovax"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
