"""Bounds on what one chat request may ask of the LLM, checked before any media is fetched or token generated.

vLLM would refuse some of these itself, but late (after the encoders ran), with messages about its internals, or
not at all (a 50k-value JSON-schema enum compiles for seconds; a `top_k` of 2**70 overflows into a 500).
"""

from __future__ import annotations

import json

from hcxserve.config import RequestLimits
from hcxserve.protocol.errors import InvalidRequestError
from hcxserve.protocol.openai import ChatCompletionRequest, TextPart


def _over(param: str, what: str, limit: int, code: str = "over_limit") -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {what}, over the limit of {limit}", param=param, code=code)


def text_chars(request: ChatCompletionRequest) -> int:
    """Characters of text the messages carry (content, text parts, reasoning, tool-call arguments)."""
    total = 0
    for message in request.messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text) for part in message.content if isinstance(part, TextPart))
        total += len(message.reasoning_content or "")
        if message.tool_calls:
            total += len(json.dumps(message.tool_calls))
    return total


def check_limits(
    request: ChatCompletionRequest, limits: RequestLimits, *, max_model_len: int, default_max_tokens: int | None = None
) -> None:
    """Raise a 400 naming the first parameter over its limit. A request without `max_tokens` may generate the
    deployment's default, or else up to the context length, per choice: that is what `n` multiplies."""
    if request.n > limits.max_n:
        raise InvalidRequestError(f"n must be at most {limits.max_n}", param="n")
    for field in ("max_completion_tokens", "max_tokens", "min_tokens", "thinking_token_budget"):
        value = getattr(request, field)
        if value is not None and value > max_model_len:
            raise _over(field, f"{value} tokens", max_model_len, "context_length_exceeded")
    max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens or max_model_len
    if request.n * max_tokens > limits.max_total_tokens:
        raise _over("n", f"n x max_tokens is {request.n * max_tokens} tokens", limits.max_total_tokens)
    if request.top_k is not None and request.top_k > limits.max_top_k:
        raise _over("top_k", f"top_k is {request.top_k}", limits.max_top_k)
    if len(request.messages) > limits.max_messages:
        raise _over("messages", f"{len(request.messages)} messages", limits.max_messages)
    chars = text_chars(request)
    if chars > limits.max_text_chars:
        raise _over("messages", f"{chars} characters of text", limits.max_text_chars)
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > limits.max_stop_sequences:
        raise _over("stop", f"{len(stops)} stop sequences", limits.max_stop_sequences)
    for i, stop in enumerate(stops):
        if len(stop) > limits.max_stop_chars:
            raise _over("stop" if isinstance(request.stop, str) else f"stop[{i}]", f"{len(stop)} characters",
                        limits.max_stop_chars)  # fmt: skip
    if request.tools and len(request.tools) > limits.max_tools:
        raise _over("tools", f"{len(request.tools)} tools", limits.max_tools)
    for field in ("tools", "response_format"):
        value = getattr(request, field)
        size = len(json.dumps(value)) if value else 0
        if size > limits.max_schema_bytes:
            raise _over(field, f"{size} bytes of JSON", limits.max_schema_bytes)
