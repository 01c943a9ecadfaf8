"""A corpus of hostile and malformed requests against the served bento, both tracks: every one is refused with a
4xx OpenAI error object (none is a 5xx, none hangs), and the bento stays healthy and answering afterwards.

Nothing here points at a non-loopback address: the SSRF guard's refusals of private ranges are unit tests with a
faked resolver (tests/unit/test_media.py); the served bento runs with the guard open to loopback, for the media
server of the other tests.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest

from tests.conftest import data_url, make_audio, make_png, make_video
from tests.e2e.helpers import HEALTHY, MODELS, PLAIN, ask, client_for

HI = [{"role": "user", "content": "hi"}]


def _saved(fmt: str, size=(16, 16), mode="RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, 99).save(buffer, fmt)
    return buffer.getvalue()


def body(**fields) -> dict:
    return {"messages": HI, "max_tokens": 4, **fields}


def parts(*content) -> dict:
    return {"messages": [{"role": "user", "content": [*content, {"type": "text", "text": "?"}]}], "max_tokens": 4}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def audio(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


PNG = make_png()
JSON_BODIES = {  # raw bodies: (name, bytes)
    "not-json": b"{not json",
    "truncated": b'{"messages": [{"role": "user", "content": "hi"',
    "empty": b"",
    "array": b"[1, 2, 3]",
    "string": b'"hello"',
    "null": b"null",
    "deep-array": b"[" * 10000 + b"]" * 10000,
    "deep-object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "deep-tools": json.dumps(body())[:-1].encode() + b', "tools": [' + b"[" * 200 + b"]" * 200 + b"]}",
    "nan-tools": json.dumps(body())[:-1].encode() + b', "tools": [{"x": NaN}]}',
    "infinity-format": json.dumps(body())[:-1].encode() + b', "response_format": {"x": Infinity}}',
    "minus-infinity-temperature": json.dumps(body())[:-1].encode() + b', "temperature": -Infinity}',
    "overflow-float": json.dumps(body())[:-1].encode() + b', "top_p": 1e999}',
    "nan-tool-call": b'{"messages": [{"role": "assistant", "tool_calls": [{"id": NaN}]}, '
    b'{"role": "user", "content": "hi"}]}',
    "nan-template-kwargs": json.dumps(body())[:-1].encode() + b', "chat_template_kwargs": {"thinking": NaN}}',
    "surrogate-content": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "surrogate-name": b'{"messages": [{"role": "user", "content": "hi", "name": "\\udfff"}]}',
    "surrogate-stop": json.dumps(body())[:-1].encode() + b', "stop": ["\\ud800x"]}',
    "surrogate-tool-key": json.dumps(body())[:-1].encode() + b', "tools": [{"\\udbff": 1}]}',
    "surrogate-text-part": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud834"}]}]}',
    "invalid-utf8": b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}',
    "huge-int": json.dumps(body())[:-1].encode() + b', "seed": ' + b"9" * 5000 + b"}",
}
SCHEMA = {
    "no-messages": {"max_tokens": 4},
    "messages-empty": {"messages": []},
    "messages-string": {"messages": "hi"},
    "role-wizard": {"messages": [{"role": "wizard", "content": "hi"}]},
    "content-number": {"messages": [{"role": "user", "content": 42}]},
    "content-missing": {"messages": [{"role": "user"}]},
    "part-unknown": {"messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
    "part-no-type": {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
    "image-no-url": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    "image-empty-url": parts(image("")),
    "temperature-string": body(temperature="warm"),
    "temperature-high": body(temperature=9),
    "top-p-zero": body(top_p=0),
    "n-zero": body(n=0),
    "n-many": body(n=1000),
    "top-logprobs": body(logprobs=True, top_logprobs=50),
    "stream-string": body(stream="yes please"),
    "stream-options": body(stream=True, stream_options={"include_usage": "maybe"}),
    "template-kwargs": body(chat_template_kwargs={"add_generation_prompt": False}),
    "max-tokens-zero": body(max_tokens=0),
    "max-tokens-negative": body(max_tokens=-5),
    "tools-not-list": body(tools={"type": "function"}),
    "tool-choice-number": body(tool_choice=3),
    "model-number": {**body(), "model": 7},
    "model-unknown": {**body(), "model": "gpt-4o"},
    "extra-body-override": {**body(), "extra_body": {"temperature": 100}},
}
LIMITS = {
    "max-tokens-huge": body(max_tokens=10**9),
    "max-completion-tokens-huge": body(max_completion_tokens=2**40),
    "min-tokens-huge": body(min_tokens=10**7),
    "thinking-budget-huge": body(thinking_token_budget=2**70),
    "top-k-huge": body(top_k=2**70),
    "seed-huge": body(seed=2**70),
    "many-messages": {"messages": HI * 2000, "max_tokens": 4},
    "long-text": {"messages": [{"role": "user", "content": "x" * 2_100_000}], "max_tokens": 4},
    "many-stops": body(stop=[f"s{i}" for i in range(40)]),
    "long-stop": body(stop="s" * 1000),
    "many-tools": body(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(200)]),
    "big-schema": body(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": list(range(50000))}}}
    ),
}
MEDIA = {
    "garbage-base64": parts(image("not base64 at all!")),
    "data-url-no-comma": parts(image("data:image/png;base64")),
    "data-url-empty": parts(image("data:image/png;base64,")),
    "scheme-file": parts(image("file:///etc/passwd")),
    "scheme-s3": parts(image("s3://bucket/key.png")),
    "scheme-ftp": parts(image("ftp://127.0.0.1/x.png")),
    "scheme-gopher": parts(image("gopher://127.0.0.1:70/_x")),
    "url-unclosed-ipv6": parts(image("http://[::1/x.png")),
    "url-no-host": parts(image("http:///x.png")),
    "url-bad-port": parts(image("http://127.0.0.1:99999/x.png")),
    "url-enclosed-digits": parts(image("http://①②⑦.0.0.1/x.png")),
    "url-closed-port": parts(image("http://127.0.0.1:9/x.png")),
    "url-space-host": parts(image("http://a b.test/x.png")),
    "url-newline": parts(image("http://127.0.0.1/x\r\nHost: evil.test")),
    "image-not-an-image": parts(image(data_url(b"hello world"))),
    "image-tiny": parts(image(data_url(make_png(2, 2)))),
    "image-elongated": parts(image(data_url(make_png(4, 1000)))),
    "image-truncated": parts(image(data_url(make_png(64, 64)[:-40]))),
    "image-dds": parts(image(data_url(_saved("DDS")))),
    "image-spider": parts(image(data_url(_saved("SPIDER", mode="F")))),
    "image-blp": parts(image(data_url(_saved("BLP", mode="P")))),
    "image-ico": parts(image(data_url(_saved("ICO")))),
    "image-bomb-header": parts(image(data_url(_saved("PNG", size=(20000, 20000), mode="1")))),
    "too-many-images": parts(*[image(data_url(PNG))] * 40),
    "video-garbage": parts({"type": "video_url", "video_url": {"url": data_url(b"not a video", "video/mp4")}}),
    "video-too-many-frames": parts({"type": "video", "video": [data_url(PNG)] * 300}),
    "video-frames-differ": parts({"type": "video", "video": [data_url(PNG), data_url(make_png(32, 32))]}),
    "video-frame-garbage": parts({"type": "video", "video": [data_url(b"nope")]}),
    "video-frames-pixels": parts({"type": "video", "video": [data_url(_saved("PNG", (7000, 7000), "1"))] * 2}),
    "video-fps-zero": parts(
        {"type": "video_url", "video_url": {"url": data_url(make_video(1), "video/mp4")}, "fps": 0}
    ),  # fmt: skip
    "video-many": parts(*[{"type": "video_url", "video_url": {"url": data_url(b"v", "video/mp4")}}] * 10),
}
AUDIO_ON_B = {
    "audio-garbage": parts(audio(base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEnope").decode())),
    "audio-too-short": parts(audio(base64.b64encode(make_audio(0.03)).decode())),
    "audio-format": parts(audio(base64.b64encode(make_audio(0.5)).decode(), fmt="midi")),
    "audio-not-base64": parts(audio("%%%")),
    "audio-file-url": parts({"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}),
    "audio-wrapped-file-url": parts(audio(base64.b64encode(b"file:///etc/passwd").decode())),
    "audio-wrapped-s3": parts(audio(base64.urlsafe_b64encode(b"s3://bucket/a.wav").decode())),
    "audio-many": parts(*[audio(base64.b64encode(make_audio(0.5)).decode())] * 10),
    "audio-empty-data": parts(audio("")),
}
AUDIO_ON_A = {"audio-on-track-a": parts(audio(base64.b64encode(make_audio(0.5)).decode()))}

CASES = [
    *[(track, f"json:{name}", raw) for track in ("a", "b") for name, raw in JSON_BODIES.items()],
    *[(track, f"{kind}:{name}", json.dumps(value).encode())
      for track in ("a", "b")
      for kind, group in (("schema", SCHEMA), ("limit", LIMITS), ("media", MEDIA))
      for name, value in group.items()],
    *[("b", f"media:{name}", json.dumps(value).encode()) for name, value in AUDIO_ON_B.items()],
    *[("a", f"media:{name}", json.dumps(value).encode()) for name, value in AUDIO_ON_A.items()],
]  # fmt: skip


def test_the_corpus_is_large_and_covers_both_tracks():
    assert len(CASES) >= 150
    assert {track for track, _, _ in CASES} == {"a", "b"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as client:
        yield client


@pytest.mark.parametrize(("track", "name", "raw"), CASES, ids=[f"{t}-{n}" for t, n, _ in CASES])
def test_hostile_request_is_a_4xx_openai_error(http, track, name, raw):
    response = http.post(f"/{track}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in response.text and "site-packages" not in response.text


ROUTES = [
    ("GET", "/a/v1/chat/completions", 405), ("DELETE", "/v1/models", 405), ("GET", "/v2/models", 404),
    ("POST", "/b/v1/completions", 404), ("GET", "/../../etc/passwd", 404), ("PUT", "/b/v1/chat/completions", 405),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "status"), ROUTES)
def test_unknown_routes_and_methods_are_openai_errors(http, method, path, status):
    response = http.request(method, path)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"x-api-key": ""}]
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/b/v1/chat/completions", "/v1/models", "/metrics"])
def test_without_the_key_every_route_is_a_401(server, headers, path):
    response = httpx.request("POST" if "chat" in path else "GET", f"{server.url}{path}", json={"messages": HI},
                             headers=headers, timeout=30)  # fmt: skip
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("track", ["a", "b"])
def test_healthy_and_answering_after_the_corpus(server, track):
    assert httpx.get(f"{server.url}/health", timeout=10).json() == HEALTHY
    client = client_for(f"{server.url}/{track}/v1")
    reply = ask(client, HI, model=MODELS[track], max_tokens=4, **PLAIN[track])
    assert reply.choices[0].message.content
