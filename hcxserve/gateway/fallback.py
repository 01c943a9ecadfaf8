"""The last resort around the whole gateway app: an exception that escapes a route (BentoML's own included) becomes
a response instead of a request that never ends, and the framework's plain-text refusals (BentoML's router answers
a path it does not know with `Not Found`) become OpenAI error objects.

It matters beyond the error body: BentoML's timeout middleware, outside this one, waits for the first message a
request sends, so a route that raises before sending anything (its `/readyz` while a dependency's socket refuses
connections, at start-up) held its request open until the traffic timeout, and with it the worker's shutdown,
which waits for open requests (Ctrl-C left the gateway running for the whole timeout).
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hcxserve.protocol.errors import (
    APIError,
    MethodNotAllowedError,
    NotFoundError,
    ServiceUnavailableError,
    internal_error,
)

logger = logging.getLogger(__name__)

PROBES = frozenset({"/readyz", "/livez", "/health"})


class ErrorFallback:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        replacing: APIError | None = None

        async def tracking_send(message: Message) -> None:
            nonlocal started, replacing
            if message["type"] == "http.response.start":
                started = True
                replacing = _plain_refusal(scope, message)
                if replacing is not None:
                    return
            if replacing is not None:  # the plain body is dropped; ours goes out once it is complete
                if not message.get("more_body"):
                    await _error(replacing)(scope, receive, send)
                return
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if scope["path"] in PROBES:  # a probe that cannot tell is a "not ready"
                logger.info("%s failed; answering 503", scope["path"], exc_info=True)
                error = ServiceUnavailableError("Not ready.", code="not_ready")
            else:
                logger.exception("unhandled error on %s", scope["path"])
                error = internal_error()
            if started:
                raise
            await _error(error)(scope, receive, send)


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code)


def route_refusal(method: str, path: str, status: int) -> APIError | None:
    """Our error for a router's 404 (no such route) or 405 (no such method on it)."""
    if status == 404:
        return NotFoundError(f"No route {path}", code="not_found")
    if status == 405:
        return MethodNotAllowedError(f"{method} is not allowed on {path}")
    return None


def _plain_refusal(scope: Scope, start: Message) -> APIError | None:
    """Our error in place of a framework's plain-text 404/405."""
    content_type = dict(start.get("headers") or []).get(b"content-type", b"")
    if content_type.startswith(b"application/json"):
        return None
    return route_refusal(scope["method"], scope["path"], start["status"])
