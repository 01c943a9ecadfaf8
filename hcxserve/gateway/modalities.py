"""A request's media: found in one walk over the messages, limited, prepared (fetched, probed), encoded by the
track's components, checked, and turned into the LLM's embedding content parts.

Each modality is declared once, as a `Modality` subclass: its content part types, its count limit, the component
and method that encode it, what it sends that component, what a well-formed result looks like, and the content part
vLLM gets. `MediaInputs` runs a track's modalities (from its config) over its encoder calls; adding a modality means
one class here and a `MODALITY_COMPONENT` entry in the config. OmniServe decided the modality three times, from URL
extensions, and could disagree with itself; here the part type decides, once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel

from hcxserve.config import MODALITY_COMPONENT, MediaConfig
from hcxserve.gateway.components import ComponentCall, call_component
from hcxserve.gateway.encoder_cache import EncoderCache
from hcxserve.gateway.fetch import MediaFetcher, request_budget
from hcxserve.media.images import probe_image
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.errors import (
    InvalidRequestError,
    MediaError,
    PayloadTooLargeError,
    UpstreamError,
)
from hcxserve.protocol.openai import (
    AudioURLPart,
    ChatCompletionRequest,
    ImagePart,
    ImageURLPart,
    InlineMedia,
    InputAudioPart,
    TextPart,
    URLRef,
    VideoPart,
    VideoURLPart,
)
from hcxserve.protocol.payloads import AudioEmbedding, AudioInput, ImageInput, VideoInput, VisionEmbedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaRef:
    """A media content part and where it sits: its key in the pipeline and its `param` in errors."""

    message: int
    part: int
    content: Any

    @property
    def key(self) -> tuple[int, int]:
        return self.message, self.part

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


# file name endings of the video containers the vision encoder decodes
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpeg", ".mpg", ".ts", ".3gp")


def _path_of(url: str) -> str:
    if url[:5].lower() == "data:":
        return ""
    try:
        return urlsplit(url).path
    except ValueError:  # malformed: the fetcher refuses it, naming the part
        return ""


def wire_names(part_types: Sequence[type[BaseModel]]) -> list[str]:
    """The `type` strings of content part classes, as clients write them."""
    return [get_args(cls.model_fields["type"].annotation)[0] for cls in part_types]


class Modality:
    """One kind of media. Subclasses fill in the class attributes and the three steps."""

    name: ClassVar[str]
    part_types: ClassVar[tuple[type[BaseModel], ...]]
    method: ClassVar[str]  # the component's API that encodes it
    count_limit: ClassVar[str]  # MediaConfig field
    counted_as: ClassVar[str]  # in "too many <...>"
    count_code: ClassVar[str]
    encoder_label: ClassVar[str]  # in "The <...> failed"

    def __init__(self, media: MediaConfig, fetcher: MediaFetcher, spec: VisionTowerSpec) -> None:
        self.media = media
        self.fetcher = fetcher
        self.spec = spec

    @property
    def component(self) -> str:
        return MODALITY_COMPONENT[self.name]

    def check_count(self, refs: Sequence[MediaRef]) -> None:
        limit = getattr(self.media, self.count_limit)
        if len(refs) > limit:
            raise InvalidRequestError(
                f"too many {self.counted_as}: {len(refs)} (at most {limit} per request)",
                param="messages",
                code=self.count_code,
            )

    async def prepare(self, ref: MediaRef) -> BaseModel:
        """What the encoder is sent for this part (fetched, and refused early where that is cheap)."""
        raise NotImplementedError

    def well_formed(self, embedding: Any) -> bool:
        """Whether an encoder's result may reach vLLM (its engine dies on inconsistent embeddings)."""
        raise NotImplementedError

    @classmethod
    def upstream_part(cls, embedding: Any) -> dict[str, Any]:
        """The content part vLLM takes in place of the client's."""
        raise NotImplementedError

    def reusable(self, result: Any) -> bool:
        """Whether an encoder's result may be kept for later requests: a well-formed embedding, not a refusal."""
        return result.error is None and result.embedding is not None and self.well_formed(result.embedding)


class _VisualModality(Modality):
    """Images and videos: the vision encoder's ViT rows with their patch grid."""

    def well_formed(self, embedding: VisionEmbedding) -> bool:
        codes_expected = self.spec.discrete and self.name == "image"  # TA-Tok codes are for images, not videos
        return (
            embedding.rows == self.spec.rows_for_grid(embedding.grid_thw)
            and embedding.dim == self.spec.out_hidden_size
            and (embedding.discrete_codes is not None) == codes_expected
        )

    @classmethod
    def upstream_part(cls, embedding: VisionEmbedding) -> dict[str, Any]:
        """vLLM's `image_embeds` / `video_embeds` content part."""
        field = f"{cls.name}_embeds"
        item: dict[str, Any] = {field: embedding.embeds_b64, f"{cls.name}_grid_thw": list(embedding.grid_thw)}
        if embedding.discrete_codes is not None:
            item[f"discrete_{cls.name}_codes"] = embedding.discrete_codes
        return {"type": field, field: item}

    async def fetch_image(self, url: str, param: str) -> tuple[bytes, int]:
        """The bytes and pixel count; a non-image or an over-sized one is refused before any encoder work
        (header-only check)."""
        data = await self.fetcher.fetch(url, param=param)
        width, height = probe_image(data, self.media, param=param)
        return data, width * height


class Images(_VisualModality):
    name = "image"
    part_types = (ImageURLPart, ImagePart)
    method = "encode"
    count_limit = "max_images_per_request"
    counted_as = "images"
    count_code = "too_many_images"
    encoder_label = "vision encoder"

    async def prepare(self, ref: MediaRef) -> ImageInput:
        part = ref.content
        url = part.image_url.url if isinstance(part, ImageURLPart) else part.image
        data, _ = await self.fetch_image(url, ref.param)
        return ImageInput(data=data)


class Videos(_VisualModality):
    name = "video"
    part_types = (VideoURLPart, VideoPart)
    method = "encode_videos"
    count_limit = "max_videos_per_request"
    counted_as = "videos"
    count_code = "too_many_videos"
    encoder_label = "vision encoder (video)"

    async def prepare(self, ref: MediaRef) -> VideoInput:
        part, media = ref.content, self.media
        # clients may ask for fewer frames or pixels than the server's budget, never more
        fps = min(part.fps or media.video_fps, media.video_fps)
        max_pixels = min(part.max_pixels or media.video_max_pixels, media.video_max_pixels)
        source = part.video_url.url if isinstance(part, VideoURLPart) else part.video
        if isinstance(source, str):
            data = await self.fetcher.fetch(source, param=ref.param, max_bytes=media.max_video_bytes)
            return VideoInput(data=data, fps=fps, max_pixels=max_pixels)
        if len(source) > media.max_video_frames_given:
            raise InvalidRequestError(
                f"{ref.param}: {len(source)} frames, at most {media.max_video_frames_given} are accepted",
                param=ref.param,
                code="too_many_frames",
            )
        frames = await asyncio.gather(
            *(self.fetch_image(url, f"{ref.param}.video[{k}]") for k, url in enumerate(source))
        )
        # the frames are decoded at full size before sampling: together they get one image's pixel budget
        pixels = sum(count for _, count in frames)
        if pixels > media.max_image_pixels:
            raise PayloadTooLargeError(
                f"{ref.param}: the frames hold {pixels} pixels together, over the limit of {media.max_image_pixels}",
                param=ref.param,
            )
        return VideoInput(frames=[data for data, _ in frames], fps=fps, max_pixels=max_pixels)


_URL = re.compile(rb"[a-z][a-z0-9+.-]*://[\x09-\x0d\x20-\x7e]*\Z", re.IGNORECASE)  # printable ASCII
_MAX_URL_BASE64 = 2048


def url_inside_base64(text: str) -> str | None:
    """The reference when `text` is base64 (either alphabet) of a URL, as OmniServe's clients send it. Which
    schemes may be fetched is the fetcher's decision, as for any other URL (`s3://`, `file://` are refused there)."""
    text = text.strip()
    if len(text) > _MAX_URL_BASE64:
        return None  # audio bytes, not a reference
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if _URL.match(raw):
            return raw.decode("ascii")
    return None


class Audio(Modality):
    """`input_audio.data` comes in every form OmniServe's clients used, and OpenAI's: base64 audio bytes (OpenAI),
    a `data:` URL, an http(s) URL, or base64 of an http(s) URL (standard or URL-safe alphabet). `audio_url` parts take
    a URL or a data: URL. The server never reads storage (`s3://`, `file://`) on a client's behalf."""

    name = "audio"
    part_types = (InputAudioPart, AudioURLPart)
    method = "encode"
    count_limit = "max_audios_per_request"
    counted_as = "audio clips"
    count_code = "too_many_audios"
    encoder_label = "audio encoder"

    async def prepare(self, ref: MediaRef) -> AudioInput:
        part = ref.content
        if isinstance(part, AudioURLPart):
            source = part.audio_url.url
        else:
            source, fmt = part.input_audio.data, part.input_audio.format
            # the encoder tells the container from the bytes; a declared format is only checked for support
            if fmt is not None and fmt.lower() not in self.media.audio_formats:
                raise InvalidRequestError(
                    f"{ref.param}: audio format {fmt!r} is not supported (supported: "
                    f"{', '.join(self.media.audio_formats)})",
                    param=f"{ref.param}.input_audio.format",
                    code="unsupported_audio_format",
                )
            if not isinstance(source, InlineMedia):  # kept in the body's bytes: far too long for a URL
                source = url_inside_base64(source) or source
        data = await self.fetcher.fetch(source, param=ref.param, max_bytes=self.media.max_audio_bytes)
        return AudioInput(data=data, max_seconds=self.media.max_audio_seconds, min_seconds=self.media.min_audio_seconds)

    def well_formed(self, embedding: AudioEmbedding) -> bool:
        # the audio encoder projects to the LLM's width, as the vision encoder does on track B
        return embedding.dim == self.spec.out_hidden_size and embedding.rows >= 1 and bool(embedding.discrete_codes)

    @classmethod
    def upstream_part(cls, embedding: AudioEmbedding) -> dict[str, Any]:
        """vLLM's `audio_embeds` content part, as the Omni LLM (`hcxserve.llm.omni`) takes it."""
        return {
            "type": "audio_embeds",
            "audio_embeds": {"audio_embeds": embedding.embeds_b64, "discrete_audio_codes": embedding.discrete_codes},
        }


MODALITIES: dict[str, type[Modality]] = {m.name: m for m in (Images, Videos, Audio)}


class MediaInputs:
    """A track's modalities (from its LLM config) over its encoder calls."""

    def __init__(
        self,
        modalities: Sequence[str],
        media: MediaConfig,
        *,
        fetcher: MediaFetcher,
        spec: VisionTowerSpec,
        encode: ComponentCall,
        track: str,
        caches: Mapping[str, EncoderCache] | None = None,
    ) -> None:
        self.media = media
        self.caches = dict(caches or {})
        self.modalities = [MODALITIES[name](media, fetcher, spec) for name in modalities]
        self.encode = encode
        self.track = track
        self._by_type = {cls: m for m in self.modalities for cls in m.part_types}
        names = ["text", *(name for m in self.modalities for name in wire_names(m.part_types))]
        self._supported = ", ".join(names)

    def collect(self, request: ChatCompletionRequest) -> dict[Modality, list[MediaRef]]:
        """Every media part by modality, in order, in one walk; a part type the track does not take is refused."""
        found: dict[Modality, list[MediaRef]] = {m: [] for m in self.modalities}
        for i, message in enumerate(request.messages):
            if not isinstance(message.content, list):
                continue
            for j, part in enumerate(message.content):
                if isinstance(part, TextPart):
                    continue
                part = self._video_in_image_part(part)
                modality = self._by_type.get(type(part))
                if modality is None:
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}]: content type {part.type!r} is not supported by track "
                        f"{self.track.upper()} (supported: {self._supported})",
                        param=f"messages[{i}].content[{j}]",
                        code="unsupported_content_type",
                    )
                found[modality].append(MediaRef(i, j, part))
        return found

    def _video_in_image_part(self, part: Any) -> Any:
        """OmniServe's clients send videos as `image_url` parts (its check 8): a URL whose path ends like a video
        file, or a `data:video/...` URL, is taken as a `video_url` part where the track takes videos."""
        if not isinstance(part, ImageURLPart) or VideoURLPart not in self._by_type:
            return part
        url = part.image_url.url
        if url[:11].lower() == "data:video/" or _path_of(url).lower().endswith(VIDEO_SUFFIXES):
            return VideoURLPart(type="video_url", video_url=URLRef(url=url))
        return part

    async def embed(self, request: ChatCompletionRequest) -> EncodedMedia:
        """The upstream content part of every media part, keyed by (message, part); modalities encode concurrently."""
        found = self.collect(request)
        for modality, refs in found.items():
            modality.check_count(refs)
        with request_budget(self.media):
            encoded = await asyncio.gather(*(self._embed(modality, refs) for modality, refs in found.items() if refs))
        media = EncodedMedia()
        for modality, parts, inputs in encoded:
            media.parts.update(parts)
            if isinstance(modality, Audio) and inputs:
                media.last_audio = inputs[max(inputs)].data
            if isinstance(modality, Videos):
                media.sound = await self._sound_tracks(found[modality], inputs)
        return media

    async def _sound_tracks(self, refs: list[MediaRef], inputs: dict) -> dict[tuple[int, int], dict[str, Any]]:
        """The audio encoder's part for the sound track of each video file that has one (heard as well as seen;
        the encoder compresses a video's sound track with its MambaMia compressor). A video without sound, or
        whose sound the encoder refuses (too short, too long), is seen only."""
        audio = next((m for m in self.modalities if isinstance(m, Audio)), None)
        heard = [ref for ref in refs if inputs[ref.key].data is not None
                 and (ref.content.sound if ref.content.sound is not None else self.media.video_sound)]  # fmt: skip
        if audio is None or not heard:
            return {}
        clips = [AudioInput(data=inputs[ref.key].data, max_seconds=self.media.max_audio_seconds,
                            min_seconds=self.media.min_audio_seconds) for ref in heard]  # fmt: skip
        parts = {}
        for ref, result in zip(heard, await self._call(audio, clips)):
            if result.error is not None or result.embedding is None:
                logger.debug("%s: no sound track heard (%s)", ref.param, result.error)
                continue
            if not audio.well_formed(result.embedding):
                logger.error("audio encoder returned malformed features for %s's sound", ref.param)
                raise UpstreamError("The audio encoder returned malformed features.")
            parts[ref.key] = audio.upstream_part(result.embedding)
        return parts

    async def _embed(self, modality: Modality, refs: list[MediaRef]) -> tuple[Modality, dict, dict]:
        inputs = await asyncio.gather(*(modality.prepare(ref) for ref in refs))
        results = await self._call(modality, list(inputs))
        parts = {}
        for ref, result in zip(refs, results):
            embedding = _embedding_of(ref, result)
            if not modality.well_formed(embedding):
                logger.error("%s returned malformed features for %s: %r", modality.encoder_label, ref.param, embedding)
                raise UpstreamError(f"The {modality.encoder_label} returned malformed features.")
            parts[ref.key] = modality.upstream_part(embedding)
        return modality, parts, {ref.key: item for ref, item in zip(refs, inputs)}

    async def _call(self, modality: Modality, inputs: list) -> Sequence:
        """The encodings of `inputs`: from the component's cache, and one batched call for the items it does not
        hold. Anything but a client error becomes a 502 without internals."""

        async def call(method: str, items: list) -> Sequence:
            return await call_component(self.encode, modality.component, method, items, label=modality.encoder_label)

        cache = self.caches.get(modality.component)
        if cache is None:
            return await call(modality.method, inputs)
        return await cache.encode(modality.method, inputs, call, keep=modality.reusable)


@dataclass
class EncodedMedia:
    """A request's media as vLLM takes them, by (message, part): each part's, the sound track of a video part (its
    own part, right after the video's), and the last input audio's bytes (the voice a spoken answer may clone)."""

    parts: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    last_audio: bytes | None = None
    sound: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # a video's sound track, after it


def _embedding_of(ref: MediaRef, result: Any) -> Any:
    """The embedding an encoder returned for one part, or the client error it reported instead (413 when the part
    was over a limit)."""
    if result.error is not None or result.embedding is None:
        error_type = PayloadTooLargeError if result.status == 413 else MediaError
        raise error_type(f"{ref.param}: {result.error or 'could not be encoded'}", param=ref.param)
    return result.embedding
