"""Chat-completion serving: validate -> fetch media -> encode -> generate -> respond.

The same pipeline serves every track; what a track accepts and which components it calls come from its
`TrackConfig` and the components handed in. Nothing here knows about BentoML or HTTP frameworks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from hcxserve.audio_inputs import AudioInputs
from hcxserve.config import TrackConfig
from hcxserve.llm_client import LLMClient
from hcxserve.protocol.errors import APIError, InvalidRequestError, NotFoundError, internal_error
from hcxserve.protocol.openai import (
    AUDIO_PART_TYPES,
    IMAGE_PART_TYPES,
    VIDEO_PART_TYPES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    TextPart,
)
from hcxserve.responses import SSE_DONE, build_chunk, build_response, sse_error, sse_event
from hcxserve.visual_inputs import VisualInputs

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
# content part classes and their wire names, per modality a track's LLM may accept
_PART_TYPES = {
    "image": (IMAGE_PART_TYPES, ("image_url", "image")),
    "video": (VIDEO_PART_TYPES, ("video_url", "video")),
    "audio": (AUDIO_PART_TYPES, ("input_audio", "audio_url")),
}


class ChatCompletionServing:
    def __init__(
        self,
        config: TrackConfig,
        *,
        llm: LLMClient,
        visual_inputs: VisualInputs,
        audio_inputs: AudioInputs | None = None,
    ) -> None:
        self.config = config
        self.llm = llm
        self.visual_inputs = visual_inputs
        self.audio_inputs = audio_inputs
        self.model_name = config.llm.served_model_name
        self._accepted_models = {self.model_name, *config.llm.aliases}
        modalities = [m for m in config.llm.modalities if m != "audio" or audio_inputs is not None]
        self._part_types = (TextPart, *(cls for m in modalities for cls in _PART_TYPES[m][0]))
        self._part_names = ", ".join(["text", *(name for m in modalities for name in _PART_TYPES[m][1])])

    # ------------------------------------------------------------------------------------------ public API
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.config.llm.max_model_len)])

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Return a response, or an async iterator of SSE strings whose first chunk has already arrived
        (so failures before any token are raised here and can still get a proper status code)."""
        self._check_request(request)
        embeddings = await self._embed(request)
        body = self._upstream_body(request, embeddings)
        if not request.stream:
            return build_response(await self.llm.chat(body), self.model_name)
        upstream = self.llm.chat_stream(body)
        first = await anext(upstream, None)
        return self._sse(first, upstream)

    # ------------------------------------------------------------------------------------------ validation
    def _check_request(self, request: ChatCompletionRequest) -> None:
        if request.model and request.model not in self._accepted_models:
            raise NotFoundError(
                f"The model {request.model!r} does not exist; this endpoint serves {self.model_name!r}.", param="model"
            )
        if request.n > self.config.gateway.max_n:
            raise InvalidRequestError(f"n must be at most {self.config.gateway.max_n}", param="n")
        for i, message in enumerate(request.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if not isinstance(part, self._part_types):
                        raise InvalidRequestError(
                            f"messages[{i}].content[{j}]: content type {part.type!r} is not supported by track "
                            f"{self.config.track.upper()} (supported: {self._part_names})",
                            param=f"messages[{i}].content[{j}]",
                            code="unsupported_content_type",
                        )

    async def _embed(self, request: ChatCompletionRequest) -> dict[tuple[int, int], Any]:
        """Every media part's embedding, keyed by (message, part); images, videos and audio encode concurrently."""
        if self.audio_inputs is None:
            return await self.visual_inputs.embed(request)
        visual, audio = await asyncio.gather(self.visual_inputs.embed(request), self.audio_inputs.embed(request))
        return {**visual, **audio}

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
        max_tokens = request.max_completion_tokens or request.max_tokens or self.config.gateway.default_max_tokens
        if max_tokens:
            body["max_tokens"] = max_tokens
        # The template and vLLM's reasoning parser both read `thinking`; track A reasons only when asked to,
        # track B unless asked not to.
        thinking = request.reasoning(default=self.config.llm.reasoning_by_default)
        body["chat_template_kwargs"] = {**(request.chat_template_kwargs or {}), "thinking": thinking}
        if request.stream:
            options = request.stream_options
            body["stream_options"] = {
                "include_usage": bool(options and options.include_usage),
                "continuous_usage_stats": bool(options and options.continuous_usage_stats),
            }
        return body

    @staticmethod
    def _upstream_part(part: Any, embedding: Any) -> dict[str, Any]:
        if isinstance(part, TextPart):
            return {"type": "text", "text": part.text}
        assert embedding is not None
        return embedding.upstream_part()

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
