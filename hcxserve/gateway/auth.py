"""API keys: an ASGI middleware in front of every gateway route but liveness and readiness.

Clients send a key the ways OpenAI's SDKs do: `Authorization: Bearer <key>` (OpenAI), `api-key: <key>` (Azure
OpenAI) or `x-api-key: <key>`. Keys are compared in constant time against every configured key (several allow
rotation), and never logged. A request without a valid key gets OpenAI's 401 error object.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hcxserve.config import AuthConfig
from hcxserve.protocol.errors import AuthenticationError

logger = logging.getLogger(__name__)

# Probes must work without credentials (container runtimes, BentoCloud); they reveal nothing but up/ready.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/health"})


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, from the first of its key headers."""
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name in (b"api-key", b"x-api-key") and value.strip():
            return value.strip()
    return None


class APIKeyAuth:
    """Made when the server starts (not when a bento is built), so keys are read where they are deployed."""

    def __init__(self, app: ASGIApp, *, auth: AuthConfig, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = [key.encode() for key in auth.keys()]
        self.open_paths = open_paths
        if not self.keys and not auth.allow_unauthenticated:
            raise RuntimeError(
                "no API key is configured: set HCX_AUTH__API_KEYS (or HCX_AUTH__API_KEYS_FILE), or "
                "HCX_AUTH__ALLOW_UNAUTHENTICATED=true to serve without keys"
            )
        if not self.keys:
            logger.warning("no API key is configured: the gateway serves anyone who can reach it (local use only)")

    def accepts(self, key: bytes | None) -> bool:
        # every key is compared, so the time taken says nothing about which one nearly matched
        matches = [hmac.compare_digest(key or b"", expected) for expected in self.keys]
        return key is not None and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.keys
            or scope["type"] not in ("http", "websocket")
            or scope["path"] in self.open_paths
            or self.accepts(presented_key(scope["headers"]))
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        error = AuthenticationError(
            "Missing or invalid API key: send it as `Authorization: Bearer <key>` (or an `api-key` header)."
        )
        response = JSONResponse(error.to_dict(), status_code=error.status_code, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
