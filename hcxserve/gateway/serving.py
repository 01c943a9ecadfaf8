"""One track's chat completions: validate -> media (fetch, encode) -> generate -> respond.

The same pipeline serves every track; what a track accepts and which components it calls come from its
`TrackConfig` and the encoder call handed in. Nothing here knows about BentoML or HTTP frameworks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from hcxserve.config import GatewayConfig, TrackConfig
from hcxserve.gateway.answer_media import AnswerMedia
from hcxserve.gateway.components import ComponentCall
from hcxserve.gateway.images import ask_for_image, check_image_request
from hcxserve.gateway.limits import check_limits
from hcxserve.gateway.llm_client import LLMClient
from hcxserve.gateway.modalities import EncodedMedia, MediaInputs
from hcxserve.gateway.responses import SSE_DONE, build_chunk, build_response, sse_error, sse_event
from hcxserve.gateway.speech import ask_for_speech, check_speech_request, check_voice, transcript_of
from hcxserve.gateway.storage import InlineStore, MediaStore
from hcxserve.protocol.errors import APIError, NotFoundError, UpstreamError, internal_error
from hcxserve.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    TextPart,
)

logger = logging.getLogger(__name__)

# Request fields handed to vLLM unchanged when the client set them.
_PASSTHROUGH_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "min_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    "skip_special_tokens",
    "response_format",
    "tools",
    "tool_choice",
    "thinking_token_budget",
    "include_reasoning",
)


_VOICES_TTL_S = 300.0

# a component's readiness probe (the encoders' BentoML /readyz, through their dependency clients)
Probe = Callable[[], Awaitable[bool]]


class ChatCompletionServing:
    def __init__(
        self,
        track: TrackConfig,
        gateway: GatewayConfig,
        *,
        llm: LLMClient,
        media: MediaInputs,
        components: ComponentCall | None = None,
        store: MediaStore | None = None,
        probes: Mapping[str, Probe] | None = None,
    ) -> None:
        self.track = track
        self.gateway = gateway
        self.llm = llm
        self.media = media
        self.components = components  # the track's decoders (and encoders), by (component, method, *args)
        self.store = store or InlineStore()
        self.probes = dict(probes or {})
        self.model_name = track.llm.served_model_name
        self.model_names = {self.model_name, *track.llm.aliases}
        self.decoders = {kind: getattr(track.components, kind) for kind in ("audio_decoder", "vision_decoder")}
        self._voices: tuple[float, list[str]] | None = None  # (when asked, the audio decoder's named voices)

    # ------------------------------------------------------------------------------------------ public API
    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, max_model_len=self.track.llm.max_model_len)

    async def components_ready(self) -> dict[str, bool]:
        """Every component of the track by service name (`TrackA-LLM`, ...): whether it answers."""
        probes = {self.track.service_name("llm"): self.llm.healthy, **self.probes}
        states = await asyncio.gather(*(probe() for probe in probes.values()))
        return dict(zip(probes, states))

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Return a response, or an async iterator of SSE strings whose first chunk has already arrived
        (so failures before any token are raised here and can still get a proper status code)."""
        self._check_request(request)
        audio_decoder, vision_decoder = self.decoders["audio_decoder"], self.decoders["vision_decoder"]
        if request.wants_speech():
            check_speech_request(request, audio_decoder, self.track.track)
            check_voice(request.audio.voice if request.audio else None, await self._named_voices())
        if request.wants_image():
            check_image_request(request, vision_decoder, self.track.track)
        encoded = await self.media.embed(request)
        body = self._upstream_body(request, encoded)
        if request.wants_speech():
            ask_for_speech(body, audio_decoder)
        elif request.wants_image():
            ask_for_image(body)
        elif vision_decoder is not None and request.declares_image_tool():
            body["skip_special_tokens"] = False  # the model may call the tool: its image tokens must reach us
        media = None
        if (audio_decoder or vision_decoder) and self.components is not None:
            media = AnswerMedia(
                request, self.components, self.store, audio_decoder=audio_decoder, vision_decoder=vision_decoder,
                reference=encoded.last_audio, audio_as_url=self.gateway.storage.audio_as_url,
            )  # fmt: skip
        if not request.stream:
            response = build_response(await self.llm.chat(body), self.model_name)
            return await media.complete(response) if media else response
        upstream = self.llm.chat_stream(body)
        first = await anext(upstream, None)
        chunks = media.stream(first, upstream, self.model_name) if media else self._relay(first, upstream)
        return self._sse(chunks)

    async def _named_voices(self) -> list[str]:
        """The audio decoder's named voices, asked once in a while (they change only with its checkpoint)."""
        now = asyncio.get_running_loop().time()
        if self._voices is None or now - self._voices[0] > _VOICES_TTL_S:
            try:
                voices = await self.components("audio_decoder", "voices")
            except APIError:
                raise
            except Exception:
                logger.exception("audio decoder voices call failed")
                raise UpstreamError("The audio decoder failed to list its voices.") from None
            self._voices = (now, list(voices))
        return self._voices[1]

    # ------------------------------------------------------------------------------------------ validation
    def _check_request(self, request: ChatCompletionRequest) -> None:
        if request.model and request.model not in self.model_names:
            raise NotFoundError(
                f"The model {request.model!r} does not exist; this endpoint serves {self.model_name!r}.", param="model"
            )
        check_limits(
            request,
            self.gateway.limits,
            max_model_len=self.track.llm.max_model_len,
            default_max_tokens=self.gateway.default_max_tokens,
        )

    # ------------------------------------------------------------------------------------------ upstream request
    def _upstream_body(self, request: ChatCompletionRequest, encoded: EncodedMedia) -> dict[str, Any]:
        messages = []
        for i, message in enumerate(request.messages):
            out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
            if isinstance(message.content, list):
                out["content"] = []
                for j, part in enumerate(message.content):
                    out["content"].append(self._upstream_part(part, encoded.parts.get((i, j))))
                    if (i, j) in encoded.sound:
                        out["content"].append(encoded.sound[(i, j)])
            else:
                out["content"] = message.content
            if message.audio is not None and message.content is None:
                # an earlier spoken answer by its id: the model sees what it said
                out["content"] = transcript_of(message.audio.id, now=time.time(), param=f"messages[{i}].audio.id")
            for key in ("name", "tool_call_id", "tool_calls", "reasoning_content"):
                if getattr(message, key) is not None:
                    out[key] = getattr(message, key)
            messages.append(out)

        body: dict[str, Any] = {"model": self.model_name, "messages": messages, "stream": request.stream}
        for field in _PASSTHROUGH_FIELDS:
            value = getattr(request, field)
            if value is not None:
                body[field] = value
        max_tokens = request.max_completion_tokens or request.max_tokens or self.gateway.default_max_tokens
        if max_tokens:
            body["max_tokens"] = max_tokens
        # The template and vLLM's reasoning parser both read `thinking`; track A reasons only when asked to,
        # track B unless asked not to.
        thinking = request.reasoning(default=self.track.llm.reasoning_by_default)
        body["chat_template_kwargs"] = {**(request.chat_template_kwargs or {}), "thinking": thinking}
        if request.stream:
            options = request.stream_options
            body["stream_options"] = {
                "include_usage": bool(options and options.include_usage),
                "continuous_usage_stats": bool(options and options.continuous_usage_stats),
            }
        return body

    @staticmethod
    def _upstream_part(part: Any, embedding: dict[str, Any] | None) -> dict[str, Any]:
        if isinstance(part, TextPart):
            return {"type": "text", "text": part.text}
        assert embedding is not None
        return embedding

    # ------------------------------------------------------------------------------------------ streaming
    async def _relay(
        self, first: dict[str, Any] | None, upstream: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[ChatCompletionChunk]:
        if first is not None:
            yield build_chunk(first, self.model_name)
            async for event in upstream:
                yield build_chunk(event, self.model_name)

    async def _sse(self, chunks: AsyncIterator[ChatCompletionChunk]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield sse_event(chunk)
        except APIError as exc:
            yield sse_error(exc)
        except Exception:
            logger.exception("stream failed")
            yield sse_error(internal_error())
        finally:
            await chunks.aclose()  # a client gone mid-stream stops the LLM's stream and the decoders' calls now
        yield SSE_DONE
