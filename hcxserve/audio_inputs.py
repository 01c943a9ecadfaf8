"""A request's audio clips: found, limited, resolved to bytes, encoded by the audio encoder, and checked.

`input_audio.data` comes in every form OmniServe's clients used, and OpenAI's: base64 audio bytes (OpenAI), a
`data:` URL, an http(s) URL, or base64 of an http(s) URL (standard or URL-safe alphabet). `audio_url` parts take
a URL or a data: URL. `s3://` and `file://` references are refused: the server never reads storage on a client's
behalf.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hcxserve.config import MediaConfig
from hcxserve.media import MediaFetcher, PartRef
from hcxserve.protocol.errors import InvalidRequestError, UpstreamError
from hcxserve.protocol.openai import AudioURLPart, ChatCompletionRequest, InputAudioPart
from hcxserve.protocol.payloads import AudioEmbedding, AudioEncoding, AudioInput
from hcxserve.visual_inputs import call_encoder, check_count, embedding_of

logger = logging.getLogger(__name__)

AudioEncoder = Callable[[list[AudioInput]], Awaitable[Sequence[AudioEncoding]]]
_URL = re.compile(rb"[a-z][a-z0-9+.-]*://[\x09-\x0d\x20-\x7e]*\Z", re.IGNORECASE)  # printable ASCII
_MAX_URL_BASE64 = 2048


@dataclass(frozen=True)
class AudioRef(PartRef):
    content: InputAudioPart | AudioURLPart


@dataclass(frozen=True)
class AudioEmbeddingPart:
    embedding: AudioEmbedding

    def upstream_part(self) -> dict[str, Any]:
        """vLLM's `audio_embeds` content part, as the Omni LLM (`hcxserve.vllm_omni`) takes it."""
        return {
            "type": "audio_embeds",
            "audio_embeds": {
                "audio_embeds": self.embedding.embeds_b64,
                "discrete_audio_codes": self.embedding.discrete_codes,
            },
        }


def find_audio_refs(request: ChatCompletionRequest) -> list[AudioRef]:
    return [
        AudioRef(i, j, part)
        for i, message in enumerate(request.messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, (InputAudioPart, AudioURLPart))
    ]


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


class AudioInputs:
    def __init__(
        self, config: MediaConfig, *, fetcher: MediaFetcher, embed_dim: int, encode_audio: AudioEncoder
    ) -> None:
        self.config = config
        self.fetcher = fetcher
        self.embed_dim = embed_dim
        self.encode_audio = encode_audio

    async def embed(self, request: ChatCompletionRequest) -> dict[tuple[int, int], AudioEmbeddingPart]:
        refs = find_audio_refs(request)
        if not refs:
            return {}
        check_count(refs, self.config.max_audios_per_request, "audio clips", code="too_many_audios")
        inputs = await asyncio.gather(*(self._input(ref) for ref in refs))
        results = await call_encoder(self.encode_audio, list(inputs), "audio encoder")
        out = {}
        for ref, result in zip(refs, results):
            embedding = embedding_of(ref, result)
            self._check_embedding(embedding)
            out[ref.key] = AudioEmbeddingPart(embedding)
        return out

    async def _input(self, ref: AudioRef) -> AudioInput:
        part = ref.content
        if isinstance(part, AudioURLPart):
            source = part.audio_url.url
        else:
            source, fmt = part.input_audio.data, part.input_audio.format
            # the encoder tells the container from the bytes; a declared format is only checked for support
            if fmt is not None and fmt.lower() not in self.config.audio_formats:
                raise InvalidRequestError(
                    f"{ref.param}: audio format {fmt!r} is not supported (supported: "
                    f"{', '.join(self.config.audio_formats)})",
                    param=f"{ref.param}.input_audio.format",
                    code="unsupported_audio_format",
                )
            source = url_inside_base64(source) or source
        media = await self.fetcher.fetch(source, param=ref.param, max_bytes=self.config.max_audio_bytes)
        return AudioInput(data=media.data, max_seconds=self.config.max_audio_seconds)

    def _check_embedding(self, embedding: AudioEmbedding) -> None:
        if embedding.dim != self.embed_dim or embedding.rows < 1 or not embedding.discrete_codes:
            logger.error(
                "audio encoder output %sx%s, expected width %s", embedding.rows, embedding.dim, self.embed_dim
            )
            raise UpstreamError("The audio encoder returned malformed features.")
