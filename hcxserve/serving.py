"""Chat-completion serving: validate -> fetch media -> encode -> generate -> respond.

The same pipeline serves every track; what a track accepts and which components it calls come from its
`TrackConfig` and the components handed in. Nothing here knows about BentoML or HTTP frameworks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hcxserve.config import TrackConfig
from hcxserve.llm_client import LLMClient
from hcxserve.media import MediaFetcher, probe_image
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.errors import (
    APIError,
    InvalidRequestError,
    MediaError,
    NotFoundError,
    UpstreamError,
    internal_error,
)
from hcxserve.protocol.openai import (
    IMAGE_PART_TYPES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ImagePart,
    ImageURLPart,
    ModelCard,
    ModelList,
    TextPart,
)
from hcxserve.protocol.payloads import ImageEmbedding, ImageEncoding, ImageInput
from hcxserve.responses import SSE_DONE, build_chunk, build_response, sse_error, sse_event

logger = logging.getLogger(__name__)

ImageEncoder = Callable[[list[ImageInput]], Awaitable[Sequence[ImageEncoding]]]

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


@dataclass(frozen=True)
class _ImageRef:
    message: int
    part: int
    url: str

    @property
    def param(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


class ChatCompletionServing:
    def __init__(
        self,
        config: TrackConfig,
        *,
        llm: LLMClient,
        encode_images: ImageEncoder,
        fetcher: MediaFetcher,
        vision_spec: VisionTowerSpec,
    ) -> None:
        self.config = config
        self.llm = llm
        self.encode_images = encode_images
        self.fetcher = fetcher
        self.vision_spec = vision_spec
        self.model_name = config.llm.served_model_name
        self._accepted_models = {self.model_name, *config.llm.aliases}

    # ------------------------------------------------------------------------------------------ public API
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.config.llm.max_model_len)])

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Return a response, or an async iterator of SSE strings whose first chunk has already arrived
        (so failures before any token are raised here and can still get a proper status code)."""
        self._check_request(request)
        embeddings = await self._encode_request_images(request)
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
                    if not isinstance(part, (TextPart, *IMAGE_PART_TYPES)):
                        raise InvalidRequestError(
                            f"messages[{i}].content[{j}]: content type {part.type!r} is not supported by track "
                            f"{self.config.track.upper()} (supported: text, image_url, image)",
                            param=f"messages[{i}].content[{j}]",
                            code="unsupported_content_type",
                        )

    @staticmethod
    def _image_refs(request: ChatCompletionRequest) -> list[_ImageRef]:
        refs = []
        for i, message in enumerate(request.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, ImageURLPart):
                        refs.append(_ImageRef(i, j, part.image_url.url))
                    elif isinstance(part, ImagePart):
                        refs.append(_ImageRef(i, j, part.image))
        return refs

    # ------------------------------------------------------------------------------------------ media
    async def _encode_request_images(self, request: ChatCompletionRequest) -> dict[tuple[int, int], ImageEmbedding]:
        refs = self._image_refs(request)
        if not refs:
            return {}
        limit = self.config.media.max_images_per_request
        if len(refs) > limit:
            raise InvalidRequestError(
                f"too many images: {len(refs)} (at most {limit} per request)", param="messages", code="too_many_images"
            )
        fetched = await asyncio.gather(*(self.fetcher.fetch(ref.url, param=ref.param) for ref in refs))
        for ref, media in zip(refs, fetched):
            probe_image(media.data, self.config.media, param=ref.param)
        try:
            results = await self.encode_images([ImageInput(data=media.data) for media in fetched])
        except APIError:
            raise
        except Exception:
            logger.exception("vision encoder call failed")
            raise UpstreamError("The vision encoder failed to process the request.") from None
        if len(results) != len(refs):
            raise UpstreamError("The vision encoder returned a wrong number of results.")
        embeddings = {}
        for ref, result in zip(refs, results):
            if result.error is not None or result.embedding is None:
                raise MediaError(f"{ref.param}: {result.error or 'the image could not be encoded'}", param=ref.param)
            self._check_embedding(result.embedding)
            embeddings[(ref.message, ref.part)] = result.embedding
        return embeddings

    def _check_embedding(self, embedding: ImageEmbedding) -> None:
        # vLLM's engine dies on embeddings whose rows disagree with their grid (and silently mis-places a smaller
        # grid), so nothing inconsistent may reach it.
        expected_rows = self.vision_spec.rows_for_grid(embedding.grid_thw)
        if embedding.rows != expected_rows or embedding.dim != self.vision_spec.out_hidden_size:
            logger.error(
                "encoder output %sx%s for grid %s, expected %sx%s",
                embedding.rows,
                embedding.dim,
                embedding.grid_thw,
                expected_rows,
                self.vision_spec.out_hidden_size,
            )
            raise UpstreamError("The vision encoder returned malformed features.")

    # ------------------------------------------------------------------------------------------ upstream request
    def _upstream_body(
        self, request: ChatCompletionRequest, embeddings: dict[tuple[int, int], ImageEmbedding]
    ) -> dict[str, Any]:
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
        # The template and vLLM's reasoning parser both read `thinking`; track A defaults to no reasoning.
        body["chat_template_kwargs"] = {**(request.chat_template_kwargs or {}), "thinking": request.thinking}
        if request.stream:
            options = request.stream_options
            body["stream_options"] = {
                "include_usage": bool(options and options.include_usage),
                "continuous_usage_stats": bool(options and options.continuous_usage_stats),
            }
        return body

    @staticmethod
    def _upstream_part(part: Any, embedding: ImageEmbedding | None) -> dict[str, Any]:
        if isinstance(part, TextPart):
            return {"type": "text", "text": part.text}
        assert embedding is not None
        return {
            "type": "image_embeds",
            "image_embeds": {"image_embeds": embedding.embeds_b64, "image_grid_thw": list(embedding.grid_thw)},
        }

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
