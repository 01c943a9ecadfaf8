"""One track's chat completions: validate -> media (fetch, encode) -> generate -> respond.

The same pipeline serves every track; what a track accepts and which components it calls come from its
`TrackConfig` and the encoder call handed in. Nothing here knows about BentoML or HTTP frameworks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from hcxserve.config import GatewayConfig, TrackConfig
from hcxserve.gateway.limits import check_limits
from hcxserve.gateway.llm_client import LLMClient
from hcxserve.gateway.modalities import MediaInputs
from hcxserve.gateway.responses import SSE_DONE, build_chunk, build_response, sse_error, sse_event
from hcxserve.gateway.speech import ask_for_speech, attach_speech, check_speech_request
from hcxserve.protocol.errors import APIError, NotFoundError, internal_error
from hcxserve.protocol.openai import ChatCompletionRequest, ChatCompletionResponse, ModelCard, TextPart

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
        probes: Mapping[str, Probe] | None = None,
    ) -> None:
        self.track = track
        self.gateway = gateway
        self.llm = llm
        self.media = media
        self.probes = dict(probes or {})
        self.model_name = track.llm.served_model_name
        self.model_names = {self.model_name, *track.llm.aliases}

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
        speech = request.wants_speech()
        if speech:
            check_speech_request(request, self.track.components.audio_decoder, self.track.track)
        embeddings = await self.media.embed(request)
        body = self._upstream_body(request, embeddings)
        if speech:
            ask_for_speech(body, self.track.components.audio_decoder)
        if not request.stream:
            response = build_response(await self.llm.chat(body), self.model_name)
            # the track's component call (MediaInputs' encoders' and the decoders' alike)
            return await attach_speech(response, request, self.media.encode) if speech else response
        upstream = self.llm.chat_stream(body)
        first = await anext(upstream, None)
        return self._sse(first, upstream)

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
    def _upstream_body(self, request: ChatCompletionRequest, embeddings: dict[tuple[int, int], Any]) -> dict[str, Any]:
        messages = []
        for i, message in enumerate(request.messages):
            out: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
            if isinstance(message.content, list):
                out["content"] = [
                    self._upstream_part(part, embeddings.get((i, j))) for j, part in enumerate(message.content)
                ]
            else:
                out["content"] = message.content
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
    async def _sse(self, first: dict[str, Any] | None, upstream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
        try:
            if first is not None:
                yield sse_event(build_chunk(first, self.model_name))
                async for event in upstream:
                    yield sse_event(build_chunk(event, self.model_name))
        except APIError as exc:
            yield sse_error(exc)
        except Exception:
            logger.exception("stream failed")
            yield sse_error(internal_error())
        yield SSE_DONE
