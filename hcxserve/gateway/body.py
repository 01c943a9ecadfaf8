"""Reading a chat request's body: bounded while it arrives, parsed (off the event loop when large) into JSON that
the LLM can take again, then validated into the protocol model. A large body's long base64 media stays in its
bytes (`inline_media`): no multi-megabyte str is built, and the parser holds the GIL for the small rest only.

What `json.loads` accepts but nothing downstream can encode is refused here, as a 400: `NaN`/`Infinity` (and
numbers that overflow to them), lone UTF-16 surrogates, and nesting beyond a depth limit (which would also blow
the recursion limit of the encoders on the way to vLLM).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import msgspec
import pydantic
from starlette.requests import Request

from hcxserve.gateway import inline_media
from hcxserve.protocol.errors import InvalidRequestError, PayloadTooLargeError, invalid_request_from_validation
from hcxserve.protocol.openai import ChatCompletionRequest

# bodies above this are parsed off the event loop, so one large upload does not stall every other request
_PARSE_INLINE_BYTES = 256 << 10
# what msgspec raises for a body it will not parse (the caller then decides what that means)
_MSGSPEC_REFUSALS = (msgspec.MsgspecError, ValueError, RecursionError)
_SURROGATE = re.compile("[\ud800-\udfff]")


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused as soon as it passes `max_bytes` (declared or not: chunked bodies count as they arrive)."""
    too_large = PayloadTooLargeError(f"request body is over the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(text)
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(name)  # NaN, Infinity, -Infinity: not JSON, and vLLM cannot encode them either


def _well_formed(value: Any, max_depth: int) -> bool:
    """No nesting deeper than `max_depth` and no lone UTF-16 surrogate in any string (neither can be encoded
    again for the LLM)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            # isascii() is O(1) on CPython: megabytes of base64 skip the scan
            if not node.isascii() and _SURROGATE.search(node):
                return False
        elif isinstance(node, (dict, list)):
            if depth > max_depth:
                return False
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    return False
                stack.append((child, depth + 1))
    return True


def _parse_whole(raw: bytes) -> Any:
    """msgspec parses (a vLLM dependency: ~3x faster than `json`, but it holds the GIL while it works). What it
    refuses (NaN, 1e999, lone surrogates, deep nesting, bad UTF-8) is parsed again by `json`, whose hooks decide
    exactly as before."""
    try:
        return msgspec.json.decode(raw)
    except _MSGSPEC_REFUSALS:
        try:
            return json.loads(raw, parse_float=_finite, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None


def _parse_without_inline_media(raw: bytes) -> Any | None:
    """The body parsed with its large base64 media left in its bytes (`inline_media`); None when that does not
    give the request the whole body would."""
    cut, found = inline_media.cut(raw)
    if not found:
        return None
    try:
        body = msgspec.json.decode(cut)
    except _MSGSPEC_REFUSALS:
        return None
    return body if inline_media.place(body, found) else None


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    body = _parse_without_inline_media(raw) if len(raw) > _PARSE_INLINE_BYTES else None
    if body is None:
        body = _parse_whole(raw)
    if not _well_formed(body, max_depth):
        raise InvalidRequestError(
            f"the request body nests deeper than {max_depth} levels or holds an invalid (lone surrogate) string",
            code="invalid_json",
        )
    return body


def parse_request(raw: bytes, max_depth: int) -> ChatCompletionRequest:
    body = parse_json_body(raw, max_depth)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        raise invalid_request_from_validation(exc.errors(include_url=False)) from None


async def read_request(request: Request, max_bytes: int, max_depth: int) -> ChatCompletionRequest:
    """The request, read within `max_bytes`; a large body is parsed and validated off the event loop, so one
    upload does not hold up the worker's other requests."""
    raw = await _read_body(request, max_bytes)
    if len(raw) > _PARSE_INLINE_BYTES:
        return await asyncio.to_thread(parse_request, raw, max_depth)
    return parse_request(raw, max_depth)
