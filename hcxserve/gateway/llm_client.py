"""HTTP client for the LLM component: vLLM's OpenAI server, reached directly when it runs on this host, else
through the LLM service's BentoML URL.

BentoML gives dependency URLs as `file://<socket>` (Unix domain socket, the local default) or `tcp://host:port`;
both are handled. A call through BentoML names the service in `Runner-Name`, which BentoCloud's load balancer
routes on. vLLM's refusals of bad requests (4xx) reach the client as our own messages, or as vLLM's when it is a
short sentence about the request; anything describing internals (and every server-side failure) is logged, not
relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from hcxserve.protocol.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)

logger = logging.getLogger(__name__)


# enough connections for every stream the gateway may have open at once; a connection attempt that takes longer
# than this means the LLM service is gone, however long generation itself may take
_POOL = httpx.Limits(max_connections=256, max_keepalive_connections=64)
_CONNECT_TIMEOUT_S = 10.0
_HEALTH_TIMEOUT_S = 5.0
# vLLM down (its supervisor restarts it) or overloaded: the same to a client
_UNAVAILABLE = "The language model is unavailable; retry shortly."
_JSON = {"content-type": "application/json"}


def make_http_client(url: str, *, runner_name: str | None, timeout: float) -> httpx.AsyncClient:
    """A client for a dependency's URL as BentoML gives it: `file://<socket>`, `tcp://host:port` or http(s)."""
    parts = urlsplit(url)
    unix_socket = parts.scheme == "file"
    scheme = "http" if parts.scheme == "tcp" else parts.scheme
    return httpx.AsyncClient(
        base_url="http://localhost" if unix_socket else f"{scheme}://{parts.netloc}",
        transport=httpx.AsyncHTTPTransport(uds=parts.path if unix_socket else None, limits=_POOL),
        headers={"Runner-Name": runner_name} if runner_name else {},
        timeout=httpx.Timeout(timeout, connect=_CONNECT_TIMEOUT_S),
    )


def _on_this_host(url: str | None) -> bool:
    if url is None:
        return True
    parts = urlsplit(url)
    if parts.scheme == "file":
        return True
    try:
        return ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return parts.hostname == "localhost"


_CONTEXT_LENGTH = re.compile(r"maximum (?:context length is|model length of) (\d+)")
# what vLLM's refusals carry when they describe its internals rather than the request: pydantic dumps, Python
# reprs, tracebacks and paths
_INTERNALS = re.compile(r"validation error|input_value|Traceback|File \"|\.py\b|site-packages|<class|\{'|\n")
_MAX_RELAYED_CHARS = 300


def _error_from_upstream(status: int, body: bytes) -> APIError:
    message, param = "", None
    try:
        payload = json.loads(body)
        error = payload.get("error", payload) if isinstance(payload, dict) else {}
        message = str(error.get("message") or error.get("detail") or "")
        param = error.get("param") if isinstance(error.get("param"), str) else None
    except (ValueError, AttributeError):
        pass
    if 400 <= status < 500:
        logger.info("the LLM refused a request (HTTP %s): %s", status, message[:2000])
        if context := _CONTEXT_LENGTH.search(message):
            return InvalidRequestError(
                f"The prompt plus max_tokens is longer than the model's context of {context.group(1)} tokens.",
                param="messages",
                code="context_length_exceeded",
            )
        if _INTERNALS.search(message) or len(message) > _MAX_RELAYED_CHARS:
            message = ""  # the log has it; the client gets ours
    if status == 404:
        return NotFoundError(message or "Not found.")
    if 400 <= status < 500:
        return InvalidRequestError(message or f"The model rejected the request (HTTP {status}).", param=param)
    if status == 503:
        return ServiceUnavailableError(_UNAVAILABLE)
    logger.error("LLM upstream error %s: %s", status, body[:2000])
    return UpstreamError("The language model failed to process the request.")


class LLMClient:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    @classmethod
    def for_dependency(cls, url: str | None, *, vllm_port: int, runner_name: str, timeout: float) -> LLMClient:
        """The client for the LLM service at BentoML's dependency `url`. On this host (a Unix socket, a loopback
        address, or no URL: not served by BentoML) the service's worker only proxies to its vLLM server, which
        listens on this host's loopback at `vllm_port`: requests go to vLLM itself, a Python hop fewer that copied
        every multi-megabyte embeddings body once more (it took ~5% of a core while 27-MB uploads streamed in).
        A service on another host (BentoCloud: a pod of its own) is reached through its URL."""
        if _on_this_host(url):
            return cls.for_url(f"http://127.0.0.1:{vllm_port}", runner_name=None, timeout=timeout)
        return cls.for_url(url, runner_name=runner_name, timeout=timeout)

    @classmethod
    def for_url(cls, url: str, *, runner_name: str | None = "LLM", timeout: float = 600.0) -> LLMClient:
        return cls(make_http_client(url, runner_name=runner_name, timeout=timeout))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def healthy(self) -> bool:
        try:
            return (await self._client.get("/health", timeout=_HEALTH_TIMEOUT_S)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _chat_request(self, body: dict[str, Any]) -> httpx.Request:
        # serialised off the event loop: with media the body holds megabytes of embeddings
        content = await asyncio.to_thread(lambda: json.dumps(body, separators=(",", ":")).encode())
        return self._client.build_request("POST", "/v1/chat/completions", content=content, headers=_JSON)

    async def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        """A pooled keep-alive connection the server closed just as it was reused fails before any response
        ("Server disconnected without sending a response"): the request never reached vLLM, so it is sent once
        more, on a new connection. A second failure is the server's."""
        try:
            return await self._client.send(request, stream=stream)
        except httpx.RemoteProtocolError as exc:
            logger.info("the LLM's connection closed before a response (%s); sending again", exc)
        return await self._client.send(request, stream=stream)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        with _transport_errors(ServiceUnavailableError(_UNAVAILABLE)):
            response = await self._send(await self._chat_request(body), stream=False)
        if response.status_code != 200:
            raise _error_from_upstream(response.status_code, response.content)
        return _json_object(response.content)

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield vLLM's stream chunks as dicts. Errors before the first chunk raise; later ones too (the caller
        turns them into an in-stream error event)."""
        request = await self._chat_request(body)
        with _transport_errors(ServiceUnavailableError(_UNAVAILABLE)):
            response = await self._send(request, stream=True)
        try:
            with _transport_errors(UpstreamError("The language model stream was interrupted.")):
                async for event in _sse_events(response):
                    yield event
        finally:
            await response.aclose()


async def _sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    if response.status_code != 200:
        raise _error_from_upstream(response.status_code, await response.aread())
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = _json_object(data)
        if "error" in event:
            error = event["error"] or {}
            raise _error_from_upstream(int(error.get("code") or 500), json.dumps(event).encode())
        yield event


def _json_object(data: str | bytes) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        logger.error("LLM answered with something that is not a JSON object: %r", data[:200])
        raise UpstreamError("The language model returned a malformed response.")
    return payload


@contextlib.contextmanager
def _transport_errors(on_failure: APIError) -> Iterator[None]:
    """Map httpx transport failures to API errors (a timeout is always a 504)."""
    try:
        yield
    except httpx.TimeoutException:
        raise UpstreamTimeoutError("The language model timed out.") from None
    except httpx.ConnectError as exc:
        # Nothing listens: the engine is still starting or its supervisor is restarting it, states the operator
        # already sees (readiness, the supervisor's log); the client gets a 503 to retry.
        logger.warning("LLM not accepting connections: %r", exc)
        raise on_failure from None
    except httpx.HTTPError as exc:
        logger.error("LLM transport error: %r", exc)
        raise on_failure from None
