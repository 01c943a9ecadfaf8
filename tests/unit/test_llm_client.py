"""The LLM client over real sockets: the URL forms BentoML hands out for a dependency (a Unix socket locally, TCP
with `BENTOML_NO_UDS` or on BentoCloud), the `Runner-Name` header BentoCloud routes on, and its timeouts."""

from __future__ import annotations

import asyncio
import http.server
import json
import socketserver
import threading
import time

import httpx
import pytest

from hcxserve.gateway.llm_client import LLMClient
from hcxserve.protocol.errors import ServiceUnavailableError, UpstreamTimeoutError

COMPLETION = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": []}


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str | None]] = []
    delay = 0.0

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.seen.append(("GET", self.path, self.headers.get("Runner-Name")))
        self._answer({})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        self.seen.append(("POST", self.path, self.headers.get("Runner-Name")))
        time.sleep(self.delay)
        self._answer(COMPLETION)

    def address_string(self) -> str:  # a Unix socket peer has no address
        return "local"

    def log_message(self, *args) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def handler():
    class Handler(_Handler):
        seen = []

    return Handler


def serve(server) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


@pytest.fixture
def tcp_server(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve(server)
    yield server
    server.shutdown()


def talk(url: str, **options) -> None:
    async def run():
        client = LLMClient.for_url(url, **options)
        try:
            assert await client.healthy()
            assert await client.chat({"messages": []}) == COMPLETION
        finally:
            await client.aclose()

    asyncio.run(run())


def test_a_unix_socket_url(handler, tmp_path):
    path = str(tmp_path / "llm.sock")
    server = _UnixHTTPServer(path, handler)
    serve(server)
    try:
        talk(f"file://{path}", runner_name="TrackA-LLM")
    finally:
        server.shutdown()
    assert handler.seen == [("GET", "/health", "TrackA-LLM"), ("POST", "/v1/chat/completions", "TrackA-LLM")]


@pytest.mark.parametrize("form", ["tcp://127.0.0.1:{port}", "http://127.0.0.1:{port}", "http://127.0.0.1:{port}/"])
def test_tcp_and_http_urls(handler, tcp_server, form):
    talk(form.format(port=tcp_server.server_address[1]))
    # the default Runner-Name is the service name BentoML gives the LLM
    assert handler.seen == [("GET", "/health", "LLM"), ("POST", "/v1/chat/completions", "LLM")]


def test_no_runner_name_header_when_none_is_given(handler, tcp_server):
    talk(f"http://127.0.0.1:{tcp_server.server_address[1]}", runner_name=None)
    assert [name for *_, name in handler.seen] == [None, None]


@pytest.mark.parametrize(
    "url", [None, "file:///run/bentoml/llm.sock", "http://127.0.0.1:3001", "http://localhost:3001"]
)
def test_an_llm_service_on_this_host_is_reached_at_its_vllm_server(handler, tcp_server, url):
    """BentoML's worker for the service only proxies to vLLM on this host's loopback: the gateway skips it."""

    async def run():
        port = tcp_server.server_address[1]
        client = LLMClient.for_dependency(url, vllm_port=port, runner_name="TrackA-LLM", timeout=7.5)
        try:
            assert client._client.timeout.read == 7.5
            assert await client.chat({"messages": []}) == COMPLETION
        finally:
            await client.aclose()

    asyncio.run(run())
    assert handler.seen == [("POST", "/v1/chat/completions", None)]


@pytest.mark.parametrize("url", ["http://trackb-llm.default.svc:3000", "https://hcx-llm.bentoml.ai"])
def test_an_llm_service_on_another_host_is_reached_through_its_url(url):
    """No traffic: only where the client would send, and the name BentoCloud routes on."""
    client = LLMClient.for_dependency(url, vllm_port=8011, runner_name="TrackB-LLM", timeout=7.5)
    try:
        assert str(client._client.base_url).rstrip("/") == url
        assert client._client.headers["Runner-Name"] == "TrackB-LLM"
        assert client._client.timeout.read == 7.5
    finally:
        asyncio.run(client.aclose())


def test_proxy_settings_are_ignored(handler, tcp_server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    talk(f"http://127.0.0.1:{tcp_server.server_address[1]}")
    assert len(handler.seen) == 2


def test_the_configured_timeout_applies(handler, tcp_server):
    handler.delay = 2.0

    async def run():
        client = LLMClient.for_url(f"http://127.0.0.1:{tcp_server.server_address[1]}", timeout=0.3)
        try:
            await client.chat({})
        finally:
            await client.aclose()

    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError):
        asyncio.run(run())
    assert time.monotonic() - started < 1.5


def test_unhealthy_when_nothing_listens():
    async def run():
        client = LLMClient.for_url("http://127.0.0.1:9")
        try:
            return await client.healthy()
        finally:
            await client.aclose()

    assert asyncio.run(run()) is False


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("failures, outcome", [(1, "answered"), (2, "503")])
def test_a_connection_closed_before_any_response_is_sent_again_once(stream, failures, outcome):
    """The server closing a pooled keep-alive connection as it is reused: the request never reached it."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        if len(calls) <= failures:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if stream:
            return httpx.Response(200, text=f"data: {json.dumps(COMPLETION)}\n\ndata: [DONE]\n\n")
        return httpx.Response(200, json=COMPLETION)

    client = LLMClient(httpx.AsyncClient(base_url="http://llm", transport=httpx.MockTransport(handler)))

    async def run():
        if stream:
            return [event async for event in client.chat_stream({"n": 1})]
        return await client.chat({"n": 1})

    if outcome == "answered":
        assert asyncio.run(run()) == ([COMPLETION] if stream else COMPLETION)
        assert calls == [{"n": 1}] * 2
    else:
        with pytest.raises(ServiceUnavailableError, match="unavailable"):
            asyncio.run(run())
        assert len(calls) == 2  # once more, never a third time
