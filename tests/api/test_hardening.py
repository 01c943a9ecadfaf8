"""What a hostile or careless client can send, and what it gets: API keys, malformed JSON, limits, unknown routes
and overload. Every refusal is a 4xx OpenAI error object naming its parameter, and never reaches the LLM."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from hcxserve.config import AuthConfig
from hcxserve.gateway.admission import Admission
from hcxserve.gateway.auth import APIKeyAuth
from tests.api.harness import gateway

TRACKS = ["a", "b"]
KEYS = "key-one,key-two"


def asgi_call(app, path, method="GET", *, kind="http", headers=(), sent=None) -> list[dict]:
    """Drive an ASGI app (a middleware under test) once, with an empty body, within 2 s; every message it sent."""
    sent = [] if sent is None else sent

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": kind, "path": path, "method": method, "headers": list(headers), "query_string": b""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=2))
    return sent


def hi(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def error_of(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


# ---------------------------------------------------------------------------------------------- API keys
@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer key-one"},
        {"Authorization": "bearer key-two"},  # rotation: every configured key works
        {"Authorization": "Bearer  key-one "},  # stray spaces around the token
        {"api-key": "key-one"},
        {"x-api-key": "key-two"},
    ],
)
def test_a_valid_key_in_any_client_header_is_accepted(headers):
    with gateway(**{"auth.api_keys": KEYS}) as gw:
        assert gw.chat(hi(), headers=headers).status_code == 200
        assert gw.http.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer key-three"}, {"Authorization": "key-one"}, {"Authorization": "Bearer "},
     {"Authorization": "Basic key-one"}, {"x-api-key": "key-one-and-more"}, {"api-key": "key-on"}],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/a/v1/chat/completions", "/v1/models", "/nowhere"])
def test_a_missing_or_wrong_key_is_a_401_before_anything_else(headers, path, caplog):
    caplog.set_level(logging.DEBUG)
    with gateway(**{"auth.api_keys": KEYS}) as gw:
        response = gw.http.post(path, json=hi(), headers=headers)
        error = error_of(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert gw.llm.requests == []
    assert error["type"] == "invalid_request_error" and error["message"] == (
        "Missing or invalid API key: send it as `Authorization: Bearer <key>` (or an `api-key` header)."
    )
    assert "key-one" not in caplog.text and "key-two" not in caplog.text


def test_probes_need_no_key():
    with gateway(**{"auth.api_keys": KEYS}) as gw:
        assert gw.http.get("/health").status_code == 200


def test_keys_from_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-11\nfile-key-old\n\n  file-key-new  \n")
    with gateway(**{"auth.api_keys_file": str(keys)}) as gw:
        for key in ("file-key-old", "file-key-new"):
            assert gw.chat(hi(), headers={"Authorization": f"Bearer {key}"}).status_code == 200
        error_of(gw.chat(hi(), headers={"Authorization": "Bearer # rotated 2026-11"}), 401)


def test_no_key_configured_refuses_to_start_unless_explicitly_allowed(caplog):
    message = (
        "no API key is configured: set HCX_AUTH__API_KEYS (or HCX_AUTH__API_KEYS_FILE), or "
        "HCX_AUTH__ALLOW_UNAUTHENTICATED=true to serve without keys"
    )
    with pytest.raises(RuntimeError) as info:
        APIKeyAuth(lambda *a: None, auth=AuthConfig())
    assert str(info.value) == message
    with caplog.at_level(logging.WARNING):
        APIKeyAuth(lambda *a: None, auth=AuthConfig(allow_unauthenticated=True))
    assert "serves anyone" in caplog.text


# ---------------------------------------------------------------------------------------------- malformed JSON
def raw_chat(gw, text: str | bytes, **kwargs):
    data = text.encode() if isinstance(text, str) else text
    return gw.http.post("/a/v1/chat/completions", content=data, headers={"content-type": "application/json"}, **kwargs)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # the C parser's recursion limit
        '{"messages": [{"role": "user", "content": "hi"}], "tools": [' + "[" * 70 + "]" * 70 + "]}",  # over max depth
        '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"x": NaN}]}',
        '{"messages": [{"role": "user", "content": "hi"}], "response_format": {"x": Infinity}}',
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
        '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1e999}]}',
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        '{"messages": [{"role": "user", "content": "hi", "name": "a\\udfffb"}]}',
        '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}',
        '{"messages": [{"role": "user", "content": "hi"}], "tools": [{"\\ud800": 1}]}',
        '{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 5000 + "}",
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
    ],
    ids=["deep-array", "deep-tools", "nan", "infinity", "minus-infinity", "overflow", "surrogate-content",
         "surrogate-name", "surrogate-stop", "surrogate-key", "huge-int", "bad-utf8"],
)  # fmt: skip
def test_json_the_llm_could_not_take_is_a_400(text):
    with gateway() as gw:
        error_of(raw_chat(gw, text), 400, "invalid_json")
        assert gw.llm.requests == []


@pytest.mark.parametrize(("limit", "status"), [(5, 200), (4, 400)])
def test_the_nesting_limit_counts_every_level(limit, status):
    # body {1} > messages [2] > message {3} > content [4] > part {5}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    with gateway(**{"gateway.limits.max_json_depth": limit}) as gw:
        assert gw.chat(body).status_code == status


def test_escaped_surrogate_pairs_are_text():
    with gateway() as gw:
        assert raw_chat(gw, '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}').status_code == 200
    assert gw.llm.body["messages"][0]["content"] == "\U0001f600"


def test_a_chunked_body_is_refused_once_over_the_limit():
    received, sent = [], []

    async def post_chunked(app):  # straight to the ASGI app: test clients buffer the whole body first
        async def receive():
            received.append(1)
            return {"type": "http.request", "body": b" " * (1 << 20), "more_body": len(received) < 64}

        async def send(message):
            sent.append(message)

        path = "/a/v1/chat/completions"
        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"transfer-encoding", b"chunked")], "root_path": "", "scheme": "http",
                 "http_version": "1.1", "client": ("127.0.0.1", 1), "server": ("gw", 80)}  # fmt: skip
        await app(scope, receive, send)

    small = {"media.max_image_bytes": 1, "media.max_video_bytes": 1, "media.max_audio_bytes": 1}
    with gateway(**{"gateway.text_bytes": 1 << 20, **small}) as gw:
        limit = gw.deployment.max_body_bytes("a")
        asyncio.run(post_chunked(gw.http.app))
    assert sent[0]["status"] == 413
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "payload_too_large" and str(limit) in error["message"]
    assert len(received) <= limit // (1 << 20) + 1  # stopped reading at the limit


def test_each_track_has_its_own_body_limit():
    with gateway("a", "b", **{"b.media.max_audio_bytes": 1, "b.media.max_video_bytes": 1}) as gw:
        limit_a, limit_b = gw.deployment.max_body_bytes("a"), gw.deployment.max_body_bytes("b")
        assert limit_b < limit_a
        padded = json.dumps(hi(user="x" * (limit_b + 10)))
        error_of(gw.http.post("/b/v1/chat/completions", content=padded), 413)
        assert gw.http.post("/a/v1/chat/completions", content=padded).status_code == 200


# ---------------------------------------------------------------------------------------------- limits
TOOL_CALLS = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
BIG_TOOL = [{"type": "function", "function": {"name": "f", "parameters": {"enum": list(range(500))}}}]
BIG_FORMAT = {"type": "json_schema", "json_schema": {"schema": {"enum": list(range(500))}}}
OVER, CONTEXT = "over_limit", "context_length_exceeded"
LIMITED = [  # body, param, message, code (with LIMITS, max_model_len is 4096)
    (hi(max_tokens=4097), "max_tokens", "4097 tokens, over the limit of 4096", CONTEXT),
    (hi(max_completion_tokens=5000), "max_completion_tokens", "5000 tokens, over the limit of 4096", CONTEXT),
    (hi(min_tokens=5000), "min_tokens", "5000 tokens, over the limit of 4096", CONTEXT),
    (hi(thinking_token_budget=2**70), "thinking_token_budget", f"{2**70} tokens, over the limit of 4096", CONTEXT),
    (hi(n=8, max_tokens=2001), "n", "n x max_tokens is 16008 tokens, over the limit of 16000", OVER),
    (hi(n=4, max_completion_tokens=4001), "n", "n x max_tokens is 16004 tokens, over the limit of 16000", OVER),
    (hi(n=4), "n", "n x max_tokens is 16384 tokens, over the limit of 16000", OVER),  # unset: up to max_model_len
    (hi(top_k=2**70), "top_k", f"top_k is {2**70}, over the limit of 100", OVER),
    ({"messages": [{"role": "user", "content": "hi"}] * 11}, "messages", "11 messages, over the limit of 10", OVER),
    ({"messages": [{"role": "user", "content": "x" * 600}, {"role": "assistant", "content": "y" * 401}]},
     "messages", "1001 characters of text, over the limit of 1000", OVER),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "z" * 600},
                                                {"type": "text", "text": "z" * 401}]}]},
     "messages", "1001 characters of text, over the limit of 1000", OVER),
    ({"messages": [{"role": "system", "content": "s" * 500},
                   {"role": "user", "content": [{"type": "text", "text": "z" * 501}]}]},
     "messages", "1001 characters of text, over the limit of 1000", OVER),
    ({"messages": [{"role": "user", "content": "u" * 400},
                   {"role": "assistant", "content": "a", "reasoning_content": "r" * 550, "tool_calls": TOOL_CALLS}]},
     "messages", f"{401 + 550 + len(json.dumps(TOOL_CALLS))} characters of text, over the limit of 1000", OVER),
    (hi(stop=["a", "b", "c", "d", "e"]), "stop", "5 stop sequences, over the limit of 4", OVER),
    (hi(stop="s" * 33), "stop", "33 characters, over the limit of 32", OVER),
    (hi(stop=["ok", "s" * 33]), "stop[1]", "33 characters, over the limit of 32", OVER),
    (hi(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(5)]), "tools",
     "5 tools, over the limit of 4", OVER),
    (hi(tools=BIG_TOOL), "tools", f"{len(json.dumps(BIG_TOOL))} bytes of JSON, over the limit of 1024", OVER),
    (hi(response_format=BIG_FORMAT), "response_format",
     f"{len(json.dumps(BIG_FORMAT))} bytes of JSON, over the limit of 1024", OVER),
]  # fmt: skip
LIMITS = {
    "gateway.limits.max_messages": 10, "gateway.limits.max_text_chars": 1000, "gateway.limits.max_stop_sequences": 4,
    "gateway.limits.max_stop_chars": 32, "gateway.limits.max_tools": 4, "gateway.limits.max_schema_bytes": 1024,
    "gateway.limits.max_top_k": 100, "gateway.limits.max_total_tokens": 16000,
    "llm.max_model_len": 4096,  # track B's embedded context is 8192
}  # fmt: skip


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize(
    ("body", "param", "message", "code"), LIMITED, ids=[f"{case[1]}-{i}" for i, case in enumerate(LIMITED)]
)
def test_each_limit_is_a_400_naming_its_parameter(track, body, param, message, code):
    with gateway(track, **LIMITS) as gw:
        error = error_of(gw.chat(body), 400)
        assert gw.llm.requests == []
    assert error == {"message": f"{param}: {message}", "type": "invalid_request_error", "param": param, "code": code}


def test_a_seed_outside_64_bits_is_refused():
    with gateway() as gw:
        assert error_of(gw.chat(hi(seed=2**63)), 400)["param"] == "seed"
        assert error_of(gw.chat(hi(seed=-(2**63) - 1)), 400)["param"] == "seed"
        assert gw.chat(hi(seed=2**63 - 1)).status_code == 200 and gw.chat(hi(seed=-(2**63))).status_code == 200


def test_requests_at_the_limits_pass():
    at_limits = hi(
        max_tokens=2000, n=8, top_k=100, stop=["a", "b", "c", "s" * 32],
        tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(4)],
    )  # fmt: skip
    with gateway(**LIMITS) as gw:
        assert gw.chat(at_limits).status_code == 200
        assert gw.chat({"messages": [{"role": "user", "content": "x" * 1000}] * 1}).status_code == 200
        assert gw.chat(hi(max_tokens=4096, min_tokens=4096, thinking_token_budget=4096)).status_code == 200
        assert gw.chat(hi(n=3)).status_code == 200  # 3 x 4096 <= 16000
        assert gw.chat(hi(stop="s" * 32, tools=BIG_TOOL[:0])).status_code == 200
        assert gw.chat({"messages": [{"role": "user", "content": "hi"}] * 10}).status_code == 200
        padding = 1024 - len(json.dumps([{"type": "function", "function": {"name": ""}}]))
        exactly = [{"type": "function", "function": {"name": "f" * padding}}]
        assert len(json.dumps(exactly)) == 1024 and gw.chat(hi(tools=exactly)).status_code == 200


def test_the_default_max_tokens_is_what_n_multiplies():
    with gateway(**{**LIMITS, "gateway.default_max_tokens": 2000}) as gw:
        assert gw.chat(hi(n=8)).status_code == 200
        assert error_of(gw.chat(hi(n=8, max_tokens=2001)), 400)["param"] == "n"


# ---------------------------------------------------------------------------------------------- routes
def test_unknown_routes_and_methods_are_openai_errors():
    with gateway() as gw:
        error = error_of(gw.http.get("/v2/chat/completions"), 404, "not_found")
        assert "/v2/chat/completions" in error["message"]
        error = error_of(gw.http.get("/a/v1/chat/completions"), 405, "method_not_allowed")
        assert error["message"] == "GET is not allowed on /a/v1/chat/completions"


# ---------------------------------------------------------------------------------------------- overload
def test_overload_is_shed_at_once_with_429_and_retry_after():
    async def scenario():
        release = asyncio.Event()
        started = []

        async def app(scope, receive, send):
            started.append(scope["path"])
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        admission = Admission(app, max_concurrent=2, max_queued=2, retry_after_s=3)

        async def call(path="/v1/chat/completions"):
            out = {}

            async def send(message):
                if message["type"] == "http.response.start":
                    out["status"] = message["status"]
                    out["headers"] = dict(message["headers"])
                else:
                    out["body"] = out.get("body", b"") + message.get("body", b"")

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            scope = {"type": "http", "path": path, "method": "POST", "headers": [], "query_string": b""}
            await admission(scope, receive, send)
            return out

        admitted = [asyncio.create_task(call()) for _ in range(4)]  # two run, two wait
        await asyncio.sleep(0.01)
        assert len(started) == 2
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        shed = await call()
        assert loop.time() - t0 < 0.1
        assert shed["status"] == 429 and shed["headers"][b"retry-after"] == b"3"
        error = json.loads(shed["body"])["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "server_busy"
        assert error["message"] == "The server is at capacity (2 requests in progress, 2 waiting); retry after 3 s."
        other = asyncio.create_task(call("/health"))  # only chat completions are admitted
        await asyncio.sleep(0.01)
        assert started[-1] == "/health"
        release.set()
        results = await asyncio.gather(*admitted, other)
        assert [r["status"] for r in results] == [200] * 5
        assert (await call())["status"] == 200  # slots come back

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- disconnects
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_cancels_the_llms_work(stream):
    async def scenario(gw):
        gw.llm.hold = asyncio.Event()  # the LLM is still generating
        gone = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, gone.set)
        received = []

        async def on_body(data):
            received.append(data)

        status = await asyncio.wait_for(gw.asgi_chat(hi(stream=stream), on_body, disconnect=gone), timeout=5)
        return status, received

    with gateway() as gw:
        status, received = asyncio.run(scenario(gw))
        assert gw.llm.cancelled == 1 and gw.llm.requests == []
        assert status == 499 and received == []
        gw.llm.hold = None
        assert gw.chat(hi()).status_code == 200  # and the next request is served


# ---------------------------------------------------------------------------------------------- the last resort
@pytest.mark.parametrize(
    ("path", "status", "code"), [("/readyz", 503, "not_ready"), ("/metrics", 500, "internal_error")]
)
def test_a_route_that_raises_is_answered_at_once_under_bentomls_timeout(path, status, code):
    """BentoML's timeout middleware waits for a request's first message: a route raising before it (its /readyz
    while a dependency refuses connections) held the request, and the worker's shutdown, for the whole timeout."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from hcxserve.gateway.fallback import ErrorFallback

    async def broken(scope, receive, send):
        raise ConnectionRefusedError("dependency socket")

    sent = asgi_call(TimeoutMiddleware(ErrorFallback(broken), timeout=60), path)  # within 2 s, not 60
    assert sent[0]["status"] == status
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == code and "dependency socket" not in error["message"]
    assert error["message"] == (
        "Not ready." if status == 503 else "The server had an error while processing your request."
    )


@pytest.mark.parametrize(("method", "status", "code"), [("GET", 404, "not_found"), ("PUT", 405, "method_not_allowed")])
def test_a_frameworks_plain_text_refusal_becomes_an_openai_error(method, status, code):
    """BentoML's own router answers unknown paths with a plain `Not Found`."""
    from starlette.responses import PlainTextResponse

    from hcxserve.gateway.fallback import ErrorFallback

    async def router(scope, receive, send):  # a plain-text refusal, its body in two chunks
        start = PlainTextResponse("Not Found", status_code=status)
        await send({"type": "http.response.start", "status": status, "headers": start.raw_headers})
        await send({"type": "http.response.body", "body": b"Not ", "more_body": True})
        await send({"type": "http.response.body", "body": b"Found", "more_body": False})

    start, body = asgi_call(ErrorFallback(router), "/v2/models", method)
    assert start["status"] == status and dict(start["headers"])[b"content-type"] == b"application/json"
    error = json.loads(body["body"])["error"]
    assert error["code"] == code
    assert error["message"] == ("No route /v2/models" if status == 404 else "PUT is not allowed on /v2/models")


def test_a_route_that_fails_after_its_response_started_is_not_answered_twice():
    from hcxserve.gateway.fallback import ErrorFallback

    async def half(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ConnectionResetError("upstream went away mid-body")

    sent = []
    with pytest.raises(ConnectionResetError):
        asgi_call(ErrorFallback(half), "/v1/models", sent=sent)
    assert [m["type"] for m in sent] == ["http.response.start"]


def test_a_websocket_without_a_key_is_closed():
    reached = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    auth = APIKeyAuth(app, auth=AuthConfig(api_keys=["k"]))
    assert asgi_call(auth, "/v1/realtime", kind="websocket") == [{"type": "websocket.close", "code": 1008}]
    assert asgi_call(auth, "/v1/realtime", kind="websocket", headers=[(b"authorization", b"Bearer k")]) == []
    assert reached == ["/v1/realtime"]
