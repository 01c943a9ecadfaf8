"""One error envelope (OpenAI's) and the exceptions that map onto it.

Serving code raises these; the gateway's single handler turns any of them into
`{"error": {"message", "type", "param", "code"}}` with the right status. Anything else becomes a 500 whose body
says nothing about the internals.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    status_code = 500
    error_type = "internal_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)
        )

    def to_dict(self) -> dict[str, Any]:
        return self.to_response().model_dump()


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class MediaError(InvalidRequestError):
    """The client's media could not be fetched, decoded or is over a limit."""

    default_code = "invalid_media"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class OverloadedError(APIError):
    """Too many requests in progress; the client should retry after a moment."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "server_busy"


class MethodNotAllowedError(APIError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(InvalidRequestError):
    status_code = 413
    default_code = "payload_too_large"


class UpstreamError(APIError):
    """A component (encoder, LLM) failed; the client's request may be fine."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    default_code = "timeout"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable"


def internal_error() -> APIError:
    return APIError("The server had an error while processing your request.", code="internal_error")


_UNION_BRANCH_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}


def _is_branch_label(part: object) -> bool:
    # pydantic puts union member names ("str", "list[...]", "ImageURLPart", "tagged-union[...]") into `loc`;
    # they are not fields the client wrote.
    return isinstance(part, str) and ("[" in part or part in _UNION_BRANCH_NAMES or part[:1].isupper())


def format_param(loc: tuple[object, ...]) -> str:
    out = ""
    previous: object = None
    for part in loc:
        # a tagged union repeats the tag ("image_url", "image_url", "url"); our tags equal their field names
        if _is_branch_label(part) or part == previous:
            continue
        previous = part
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def invalid_request_from_validation(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """Turn pydantic's error list into one clear 400: the most specific (deepest) error wins."""
    if not errors:
        return InvalidRequestError("Invalid request.")
    best = max(
        errors, key=lambda e: (len([p for p in e["loc"] if not _is_branch_label(p)]), e["type"] != "string_type")
    )
    param = format_param(tuple(best["loc"])) or None
    message = best["msg"]
    if best["type"] == "union_tag_invalid":
        ctx = best.get("ctx", {})
        message = f"unsupported content part type {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    elif best["type"] == "union_tag_not_found":
        message = "content part is missing its `type`"
    return InvalidRequestError(f"{param}: {message}" if param else message, param=param, code="invalid_value")
