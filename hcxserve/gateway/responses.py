"""The one place that builds what clients receive: responses, stream chunks and SSE framing.

vLLM names the reasoning field `reasoning`; OmniServe's clients (and DeepSeek-style SDK users) read
`reasoning_content`, so that is what we return.
"""

from __future__ import annotations

import json
import time
from typing import Any

from hcxserve.protocol.errors import APIError
from hcxserve.protocol.openai import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ToolCall,
    Usage,
    completion_id,
)


def _reasoning(message: dict[str, Any]) -> str | None:
    return message.get("reasoning_content") or message.get("reasoning") or None


def _usage(upstream: dict[str, Any] | None) -> Usage | None:
    return Usage.model_validate(upstream) if upstream else None


def build_response(upstream: dict[str, Any], model: str) -> ChatCompletionResponse:
    choices = []
    for choice in upstream.get("choices", []):
        message = choice.get("message") or {}
        choices.append(
            Choice(
                index=choice.get("index", 0),
                message=AssistantMessage(
                    content=message.get("content"),
                    reasoning_content=_reasoning(message),
                    tool_calls=[ToolCall.model_validate(c) for c in message.get("tool_calls") or []],
                ),
                finish_reason=choice.get("finish_reason"),
                logprobs=choice.get("logprobs"),
            )
        )
    return ChatCompletionResponse(
        id=upstream.get("id") or completion_id(),
        created=upstream.get("created") or int(time.time()),
        model=model,
        choices=choices,
        usage=_usage(upstream.get("usage")),
    )


def build_chunk(upstream: dict[str, Any], model: str) -> ChatCompletionChunk:
    choices = []
    for choice in upstream.get("choices", []):
        delta = choice.get("delta") or {}
        choices.append(
            ChunkChoice(
                index=choice.get("index", 0),
                delta=DeltaMessage(
                    role=delta.get("role"),
                    content=delta.get("content"),
                    reasoning_content=_reasoning(delta),
                    tool_calls=delta.get("tool_calls"),
                ),
                finish_reason=choice.get("finish_reason"),
                logprobs=choice.get("logprobs"),
            )
        )
    return ChatCompletionChunk(
        id=upstream["id"],
        created=upstream["created"],
        model=model,
        choices=choices,
        usage=_usage(upstream.get("usage")),
    )


def sse_event(chunk: ChatCompletionChunk) -> str:
    body = chunk.model_dump(exclude_none=True)
    for choice in body["choices"]:
        choice.setdefault("finish_reason", None)  # OpenAI always sends the key
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_error(error: APIError) -> str:
    return f"data: {json.dumps(error.to_dict(), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
