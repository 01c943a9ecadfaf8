"""The gateway's HTTP API in-process, over fake components.

Tests at this seam drive the real ASGI app with an HTTP client and assert on what the client gets back and on the
exact JSON body the LLM (vLLM's OpenAI server) receives. This module is the only place that knows how a gateway is
assembled: a restructuring of the gateway changes this file, not the tests.

Fakes:
- `FakeLLM`: vLLM's OpenAI server. Records every request body; answers with a programmed completion, stream,
  HTTP error or transport failure.
- `FakeVisionEncoder` / `FakeAudioEncoder`: the encoder services' `encode*` methods. Record what they are given;
  return well-formed embeddings (or programmed refusals, malformed rows, exceptions).
- `FakeWeb`: the internet for media URLs, in-process (an httpx mock transport plus a faked DNS resolver), so the
  SSRF guard stays on and no test sends traffic anywhere.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from starlette.testclient import TestClient

from hcxserve.config import dotted_overrides, load_deployment
from hcxserve.gateway.app import build_app, middlewares
from hcxserve.gateway.encoder_cache import track_caches
from hcxserve.gateway.fetch import MediaFetcher
from hcxserve.gateway.llm_client import LLMClient
from hcxserve.gateway.modalities import MediaInputs
from hcxserve.gateway.serving import ChatCompletionServing
from hcxserve.gateway.storage import media_store
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.payloads import (
    AudioEmbedding,
    AudioEncoding,
    GeneratedImage,
    SpeechAudio,
    VisionEmbedding,
    VisionEncoding,
)

WIDTH = 8  # embedding width of the fake encoders (the spec the gateway checks against)
PUBLIC_IP = "93.184.216.34"  # what FakeWeb's resolver answers for any host it is not told about; never contacted


def completion(content: str | None = "Paris.", **message: Any) -> dict[str, Any]:
    """A vLLM chat completion (non-streaming) with one choice."""
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "served-name-upstream",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content, **message}}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def chunk(delta: dict[str, Any] | None = None, *, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """A vLLM stream chunk with one choice."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "served-name-upstream",
        "choices": choices,
        **extra,
    }


def sse(*events: dict[str, Any] | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


class FakeLLM:
    """vLLM's OpenAI server. Program it with `reply` (JSON), `stream` (SSE text), `status`/`error_body` or
    `failure` (an httpx exception raised instead of answering)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply: dict[str, Any] = completion()
        self.stream: str | None = None
        self.status = 200
        self.error_body: dict[str, Any] | None = None
        self.error_text: str | None = None  # a plain-text error body instead
        self.failure: Exception | None = None
        self.health_status = 200
        self.stream_body: Callable[[], Any] | None = None  # an async iterator of raw SSE bytes, when set
        self.hold: asyncio.Event | None = None  # when set, chat requests wait for it before answering
        self.cancelled = 0  # chat requests whose caller gave up while they were held

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            assert request.method == "GET", request.method
            if self.failure is not None:
                raise self.failure
            return httpx.Response(self.health_status)
        assert (request.method, request.url.path) == ("POST", "/v1/chat/completions"), request
        if self.hold is not None:
            return self._held(request)  # httpx's MockTransport awaits a coroutine
        return self._answer(request)

    async def _held(self, request: httpx.Request) -> httpx.Response:
        try:
            await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self._answer(request)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        if self.failure is not None:
            raise self.failure
        if self.status != 200 and self.error_text is not None:
            return httpx.Response(self.status, text=self.error_text)
        if self.status != 200:
            return httpx.Response(self.status, json=self.error_body or {"error": {"message": "upstream says no"}})
        if self.requests[-1].get("stream") and self.stream_body is not None:
            return httpx.Response(200, content=self.stream_body(), headers={"content-type": "text/event-stream"})
        if self.requests[-1].get("stream"):
            text = self.stream if self.stream is not None else sse(chunk({"role": "assistant", "content": "Paris."}))
            return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=copy.deepcopy(self.reply))

    @property
    def body(self) -> dict[str, Any]:
        """The one request body received."""
        assert len(self.requests) == 1, f"{len(self.requests)} requests reached the LLM"
        return self.requests[0]


def _vision_embedding(i: int, grid: tuple[int, int, int], codes: list[int] | None, tag: str) -> VisionEncoding:
    t, h, w = grid
    return VisionEncoding(
        embedding=VisionEmbedding(
            embeds_b64=f"{tag}{i}",
            rows=t * h * w // 4,
            dim=WIDTH,
            dtype="torch.float32",
            grid_thw=grid,
            discrete_codes=codes,
        )
    )


@dataclass
class FakeVisionEncoder:
    """The VisionEncoder service. `image_results` / `video_results`, when set, replace the answers (a list, or a
    function of the inputs); `error` is raised instead of answering."""

    discrete: bool = False
    image_grid: tuple[int, int, int] = (1, 4, 4)
    video_grid: tuple[int, int, int] = (2, 4, 4)
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    calls: int = 0
    ready: bool = True  # what its readiness probe answers
    image_results: Callable[[list], list] | None = None
    video_results: Callable[[list], list] | None = None
    error: Exception | None = None

    async def encode(self, items: list) -> list[VisionEncoding]:
        self.calls += 1
        self.images.extend(items)
        if self.error is not None:
            raise self.error
        if self.image_results is not None:
            return self.image_results(items)
        codes = [7, 8, 9] if self.discrete else None
        return [
            _vision_embedding(len(self.images) - len(items) + i, self.image_grid, codes, "IMG")
            for i in range(len(items))
        ]

    async def encode_videos(self, items: list) -> list[VisionEncoding]:
        self.calls += 1
        self.videos.extend(items)
        if self.error is not None:
            raise self.error
        if self.video_results is not None:
            return self.video_results(items)
        return [
            _vision_embedding(len(self.videos) - len(items) + i, self.video_grid, None, "VID")
            for i in range(len(items))
        ]


def audio_encoding(tag: str = "AUD0", rows: int = 3, dim: int = WIDTH, codes: list[int] | None = None) -> AudioEncoding:
    return AudioEncoding(
        embedding=AudioEmbedding(
            embeds_b64=tag,
            rows=rows,
            dim=dim,
            dtype="torch.float32",
            discrete_codes=[4, 5, 6] if codes is None else codes,
            duration_s=0.12,
        )
    )


@dataclass
class FakeAudioEncoder:
    clips: list[Any] = field(default_factory=list)
    calls: int = 0
    ready: bool = True
    results: Callable[[list], list] | None = None
    error: Exception | None = None

    async def encode(self, items: list) -> list[AudioEncoding]:
        self.calls += 1
        self.clips.extend(items)
        if self.error is not None:
            raise self.error
        if self.results is not None:
            return self.results(items)
        return [audio_encoding(f"AUD{len(self.clips) - len(items) + i}") for i in range(len(items))]


FAKE_LOOKAHEAD = 100  # samples the fake audio decoder holds back from a part of a stream
FAKE_SPEAKER = [0.5, -0.25]  # the speaker vector the fake audio decoder gives a reference clip


def fake_speech(units: list[int]) -> np.ndarray:
    """The fake audio decoder's pcm16 for `units`: each unit's id, 960 times."""
    return np.repeat(np.asarray(units, dtype="<i2"), 960)


@dataclass
class FakeAudioDecoder:
    """The AudioDecoder service: a "file" per request that spells out what it was given, or (pcm16) samples that
    do, with the real decoder's parts (`start_sample`, `final`, a lookahead); `results` replaces it, `gate` holds
    each call until set."""

    requests: list[Any] = field(default_factory=list)
    ready: bool = True
    results: Callable[[list], list] | None = None
    voice_names: list[str] = field(default_factory=lambda: ["fkms", "mhwj"])
    voice_calls: int = 0
    gate: asyncio.Event | None = None

    async def decode(self, items: list) -> list[SpeechAudio]:
        self.requests.extend(items)
        if self.gate is not None:
            await self.gate.wait()
        if self.results is not None:
            return self.results(items)
        return [self._speak(r) for r in items]

    async def voices(self) -> list[str]:
        self.voice_calls += 1
        return self.voice_names

    @staticmethod
    def _speak(r) -> SpeechAudio:
        speaker = FAKE_SPEAKER if r.reference is not None else None  # a reference clip's voice, as a vector
        if r.format != "pcm16":
            data = f"{r.format}:{r.voice}:{r.units}".encode()
            return SpeechAudio(data=data, samples=960 * len(r.units), speaker=speaker)
        end = 960 * len(r.units) - (0 if r.final else FAKE_LOOKAHEAD)
        samples = fake_speech(r.units)[r.start_sample : max(end, r.start_sample)]
        return SpeechAudio(data=samples.tobytes(), samples=len(samples), speaker=speaker)


@dataclass
class FakeVisionDecoder:
    """The VisionDecoder service: a "PNG" per request that spells out what it was given (`results` replaces it)."""

    requests: list[Any] = field(default_factory=list)
    ready: bool = True
    results: Callable[[list], list] | None = None

    async def generate(self, items: list) -> list[GeneratedImage]:
        self.requests.extend(items)
        if self.results is not None:
            return self.results(items)
        return [GeneratedImage(png=f"png:{r.ratio}:{len(r.codes)}:{r.steps}:{r.seed}".encode()) for r in items]


class FakeWeb:
    """Media URLs served in-process. `pages[url]` is bytes (200), an `httpx.Response`, a function making one (given
    the request when it has `wants_request` set), or an exception to raise;
    `dns[host]` is the list of addresses the faked resolver returns (default: one public address)."""

    def __init__(self) -> None:
        self.pages: dict[str, Any] = {}
        self.dns: dict[str, list[str]] = {}
        self.fetched: list[str] = []
        self.requests: list[httpx.Request] = []  # as sent, for their headers
        self.resolved: list[str] = []
        self.connections: list[tuple[str, str | None]] = []  # (address connected to, TLS SNI name)

    def redirect(self, url: str, to: str, status: int = 302) -> None:
        self.pages[url] = httpx.Response(status, headers={"location": to})

    async def resolve(self, host: str) -> list[str]:
        self.resolved.append(host)
        return list(self.dns.get(host, [PUBLIC_IP]))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        # the fetcher connects to the address it checked and names the host in `Host`, as a server sees it
        url = f"{request.url.scheme}://{request.headers['host']}{request.url.raw_path.decode()}"
        assert request.method == "GET" and "image/*" in request.headers["accept"], request
        self.fetched.append(url)
        self.requests.append(request)
        self.connections.append((request.url.host, request.extensions.get("sni_hostname")))
        page = self.pages.get(url)
        if page is None:
            return httpx.Response(404, text="not found")
        if isinstance(page, Exception):
            raise page
        if callable(page):  # a response made per request (e.g. a streamed body)
            return page(request) if getattr(page, "wants_request", False) else page()
        if isinstance(page, httpx.Response):
            return httpx.Response(page.status_code, headers=page.headers, content=page.content)
        return httpx.Response(200, content=page)

    def fetcher(self, media_config, **options) -> MediaFetcher:
        """A fetcher on this web; `options`: MediaFetcher's keyword options (`name`, `cache_metrics`)."""
        client = httpx.AsyncClient(transport=httpx.MockTransport(self), follow_redirects=False)
        return MediaFetcher(media_config, client=client, resolver=self.resolve, **options)


def fakes_ready(fake):
    async def probe() -> bool:
        return fake.ready

    return probe


@dataclass
class TrackFakes:
    """One track's fake components."""

    llm: FakeLLM
    vision: FakeVisionEncoder
    audio: FakeAudioEncoder
    config: Any
    caches: dict[str, Any]  # the gateway's encoder caches by component kind
    speech: FakeAudioDecoder
    drawing: FakeVisionDecoder


@dataclass
class Gateway:
    """A deployment's gateway app and its fakes; `http` is the in-process HTTP client. `llm`, `vision`, `audio`
    and `config` are those of the first track served (the one a single-track test is about)."""

    track: str
    http: TestClient
    web: FakeWeb
    tracks: dict[str, TrackFakes]
    deployment: Any

    @property
    def llm(self) -> FakeLLM:
        return self.tracks[self.track].llm

    @property
    def vision(self) -> FakeVisionEncoder:
        return self.tracks[self.track].vision

    @property
    def audio(self) -> FakeAudioEncoder:
        return self.tracks[self.track].audio

    @property
    def config(self) -> Any:
        return self.tracks[self.track].config

    @property
    def caches(self) -> dict[str, Any]:
        return self.tracks[self.track].caches

    @property
    def prefix(self) -> str:
        return self.config.routes[0]

    def chat(self, body: dict[str, Any], prefix: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.http.post(f"{prefix or self.prefix}/chat/completions", json=body, **kwargs)

    async def asgi_chat(
        self, body: dict[str, Any], on_body: Callable[[bytes], Any], disconnect: asyncio.Event | None = None
    ) -> int:
        """POST to the app's ASGI interface directly (no client that buffers the response); `on_body` sees each
        body message as the app sends it; the client goes away when `disconnect` is set. Returns the status."""
        path = f"{self.prefix}/chat/completions"
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("gw", 80),
        }  # fmt: skip
        messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
        done = asyncio.Event()
        status = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            gone = [asyncio.ensure_future(e.wait()) for e in (done, disconnect) if e is not None]
            await asyncio.wait(gone, return_when=asyncio.FIRST_COMPLETED)  # connected until one of them
            for waiter in gone:
                waiter.cancel()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    await on_body(message["body"])
                if not message.get("more_body"):
                    done.set()

        await self.http.app(scope, receive, send)
        return status[0]

    def stream(self, body: dict[str, Any], prefix: str | None = None) -> list[dict[str, Any] | str]:
        """The SSE events of a streamed request: decoded JSON objects, and "[DONE]"."""
        response = self.chat({**body, "stream": True}, prefix)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for block in response.text.split("\n\n"):
            if block:
                assert block.startswith("data: "), block
                data = block[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
        return events


@contextmanager
def gateway(*tracks: str, **overrides: Any) -> Iterator[Gateway]:
    """A running gateway serving `tracks` (default: track A) over fakes, on the embedded profile's configuration;
    `overrides` are dotted config keys (`hcxserve.config.dotted_overrides`)."""
    tracks = tracks or ("a",)
    deployment = load_deployment(tracks, profile="embedded", overrides=dotted_overrides(tracks, overrides))
    store = media_store(deployment.gateway.storage)
    web = FakeWeb()
    fakes: dict[str, TrackFakes] = {}
    servings: dict[str, ChatCompletionServing] = {}
    for config in deployment.served_tracks():
        llm = FakeLLM()
        spec = VisionTowerSpec(out_hidden_size=WIDTH, spatial_merge_size=2, discrete=config.track == "b")
        vision, audio, speech = FakeVisionEncoder(discrete=spec.discrete), FakeAudioEncoder(), FakeAudioDecoder()
        drawing = FakeVisionDecoder()
        components = {"vision_encoder": vision, "audio_encoder": audio, "audio_decoder": speech,
                      "vision_decoder": drawing}  # fmt: skip

        async def call(component: str, method: str, *args: Any, components=components) -> Any:
            return await getattr(components[component], method)(*args)

        media = MediaInputs(
            config.llm.modalities, config.media, fetcher=web.fetcher(config.media), spec=spec, encode=call,
            track=config.track, caches=(caches := track_caches(config)),
        )  # fmt: skip
        llm_client = LLMClient(httpx.AsyncClient(base_url="http://llm", transport=httpx.MockTransport(llm)))
        probes = {config.service_name(kind): fakes_ready(components[kind]) for kind in config.components_by_kind()}
        servings[config.track] = ChatCompletionServing(
            config, deployment.gateway, llm=llm_client, media=media, components=call, store=store, probes=probes
        )
        fakes[config.track] = TrackFakes(llm, vision, audio, config, caches, speech, drawing)
    app = build_app(deployment, lambda: servings)
    for middleware, options in reversed(middlewares(deployment)):
        app = middleware(app, **options)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield Gateway(tracks[0], http, web, fakes, deployment)
