"""What the client gets back: responses and stream chunks built from vLLM's, in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.api.harness import chunk, completion, gateway, sse

TRACKS = ["a", "b"]
SERVED = {"a": "track_a_model", "b": "track_b_model"}
LOGPROBS = {"content": [{"token": "Paris", "logprob": -0.1, "bytes": [80], "top_logprobs": []}]}
TOOL_CALL = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def hi(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("track", TRACKS)
def test_completion(track):
    with gateway(track) as gw:
        gw.llm.reply = completion("Paris.", reasoning="capital of France")
        gw.llm.reply["choices"][0]["logprobs"] = LOGPROBS
        gw.llm.reply["choices"][0]["finish_reason"] = "length"
        gw.llm.reply["usage"]["prompt_tokens_details"] = {"cached_tokens": 8}  # vLLM's prefix cache served 8
        body = gw.chat(hi()).json()
    assert body["object"] == "chat.completion" and body["model"] == SERVED[track]
    assert body["id"] == "chatcmpl-upstream" and body["created"] == 1700000000
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["logprobs"] == LOGPROBS
    message = choice["message"]
    # vLLM calls it `reasoning`; OmniServe's and DeepSeek-style clients read `reasoning_content`
    assert message == {
        "role": "assistant",
        "content": "Paris.",
        "reasoning_content": "capital of France",
        "tool_calls": [],
    }
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": None,
    }


def test_reasoning_content_from_upstream_is_kept():
    with gateway() as gw:
        gw.llm.reply = completion("4", reasoning_content="3 + 1")
        assert gw.chat(hi()).json()["choices"][0]["message"]["reasoning_content"] == "3 + 1"


def test_tool_calls():
    with gateway() as gw:
        gw.llm.reply = completion(None, tool_calls=[TOOL_CALL])
        gw.llm.reply["choices"][0]["finish_reason"] = "tool_calls"
        choice = gw.chat(hi()).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [TOOL_CALL]


def test_several_choices_keep_their_index_and_order():
    with gateway() as gw:
        gw.llm.reply = completion("a")
        second = {**gw.llm.reply["choices"][0], "index": 1, "message": {"role": "assistant", "content": "b"}}
        gw.llm.reply["choices"].append(second)
        choices = gw.chat(hi(n=2)).json()["choices"]
    assert [(c["index"], c["message"]["content"]) for c in choices] == [(0, "a"), (1, "b")]


def test_missing_id_and_usage_get_defaults():
    with gateway() as gw:
        reply = completion("x")
        del reply["id"], reply["usage"], reply["created"]
        gw.llm.reply = reply
        body = gw.chat(hi()).json()
    assert body["id"].startswith("chatcmpl-") and body["created"] > 1700000000 and body["usage"] is None


@pytest.mark.parametrize("track", TRACKS)
def test_stream(track):
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    usage["prompt_tokens_details"] = {"cached_tokens": 4}
    with gateway(track) as gw:
        gw.llm.stream = sse(
            chunk({"role": "assistant", "content": ""}),
            chunk({"reasoning": "hmm"}),
            chunk({"content": "Par"}, logprobs=None),
            chunk({"content": "is"}, finish_reason="stop"),
            chunk(None, usage=usage),
        )
        events = gw.stream(hi(stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    payloads = events[:-1]
    assert all(p["object"] == "chat.completion.chunk" and p["model"] == SERVED[track] for p in payloads)
    assert all(p["id"] == "chatcmpl-upstream" and p["created"] == 1700000000 for p in payloads)
    deltas = [p["choices"][0]["delta"] for p in payloads[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "hmm"},
        {"content": "Par"},
        {"content": "is"},
    ]
    # OpenAI always sends `finish_reason`, null until the last content chunk
    assert [p["choices"][0]["finish_reason"] for p in payloads[:-1]] == [None, None, None, "stop"]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"] == {**usage}


def test_stream_tool_calls_and_logprobs():
    tool_delta = [
        {"index": 0, "id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    ]
    with gateway() as gw:
        first = chunk({"tool_calls": tool_delta})
        first["choices"][0]["logprobs"] = LOGPROBS
        gw.llm.stream = sse(first, chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
        events = gw.stream(hi())
    assert events[0]["choices"][0]["delta"] == {"tool_calls": tool_delta}
    assert events[0]["choices"][0]["logprobs"] == LOGPROBS
    assert events[1]["choices"][0]["delta"]["tool_calls"][0]["function"] == {"arguments": "{}"}


def test_continuous_usage_stats_reach_every_chunk():
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    with gateway() as gw:
        gw.llm.stream = sse(
            chunk({"content": "a"}, usage=usage), chunk({"content": "b"}, usage={**usage, "completion_tokens": 2})
        )
        events = gw.stream(hi(stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert [e["usage"]["completion_tokens"] for e in events[:-1]] == [1, 2]


def test_an_empty_stream_still_ends_with_done():
    with gateway() as gw:
        gw.llm.stream = "data: [DONE]\n\n"
        assert gw.stream(hi()) == ["[DONE]"]


def test_non_data_lines_in_the_upstream_stream_are_ignored():
    with gateway() as gw:
        gw.llm.stream = ": keep-alive\n\nevent: ping\n\n" + sse(chunk({"content": "ok"}))
        events = gw.stream(hi())
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [{"content": "ok"}]


def test_models_route_on_every_prefix():
    with gateway("b") as gw:
        for prefix in ("/b/v1", "/v1"):
            body = gw.http.get(f"{prefix}/models").json()
            assert body["object"] == "list"
            (card,) = body["data"]
            assert card["id"] == "track_b_model" and card["object"] == "model"
            assert card["max_model_len"] == gw.config.llm.max_model_len
        assert gw.http.get("/a/v1/models").status_code == 404


@pytest.mark.parametrize(("upstream", "status", "state"), [(200, 200, "ok"), (503, 503, "unavailable")])
def test_health_follows_the_llm(upstream, status, state):
    with gateway() as gw:
        gw.llm.health_status = upstream
        response = gw.http.get("/health")
    assert response.status_code == status
    assert response.json() == {
        "status": state, "tracks": {"a": state}, "components": {"TrackA-LLM": state, "TrackA-VisionEncoder": "ok"}
    }  # fmt: skip


def test_health_is_503_when_the_llm_is_unreachable():
    with gateway() as gw:
        gw.llm.failure = httpx.ConnectError("refused")
        response = gw.http.get("/health")
    assert response.status_code == 503 and response.json()["tracks"] == {"a": "unavailable"}


def test_health_reports_each_track():
    with gateway("a", "b") as gw:
        gw.tracks["b"].llm.health_status = 503
        response = gw.http.get("/health")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "tracks": {"a": "ok", "b": "unavailable"},
        "components": {"TrackA-LLM": "ok", "TrackA-VisionEncoder": "ok", "TrackB-LLM": "unavailable",
                       "TrackB-VisionEncoder": "ok", "TrackB-AudioEncoder": "ok", "TrackB-AudioDecoder": "ok",
                       "TrackB-VisionDecoder": "ok"},
    }  # fmt: skip


@pytest.mark.parametrize("encoder", ["vision", "audio"])
def test_health_reports_each_encoder(encoder):
    with gateway("a", "b") as gw:
        getattr(gw.tracks["b"], encoder).ready = False
        response = gw.http.get("/health")
    name = {"vision": "TrackB-VisionEncoder", "audio": "TrackB-AudioEncoder"}[encoder]
    assert response.status_code == 503 and response.json()["tracks"] == {"a": "ok", "b": "unavailable"}
    assert response.json()["components"][name] == "unavailable"


def test_chunks_are_passed_on_as_they_arrive():
    """The gateway relays each upstream chunk at once: the client has the first before vLLM sends the second."""
    first_relayed = asyncio.Event()
    received: list[bytes] = []

    async def upstream():
        yield f"data: {json.dumps(chunk({'content': 'a'}))}\n\n".encode()
        try:
            await asyncio.wait_for(first_relayed.wait(), timeout=5)
            second = "b"
        except TimeoutError:
            second = "late"
        yield f"data: {json.dumps(chunk({'content': second}))}\n\ndata: [DONE]\n\n".encode()

    async def on_body(data: bytes) -> None:
        received.append(data)
        first_relayed.set()

    with gateway() as gw:
        gw.llm.stream_body = upstream
        assert asyncio.run(gw.asgi_chat(hi(stream=True), on_body)) == 200
    events = [json.loads(line[6:]) for line in b"".join(received).decode().split("\n\n") if line[6:7] == "{"]
    assert [e["choices"][0]["delta"]["content"] for e in events] == ["a", "b"]


def test_upstream_data_lines_without_a_space_are_read():
    with gateway() as gw:
        gw.llm.stream = "data:" + json.dumps(chunk({"content": "ok"})) + "\n\ndata:[DONE]\n\n"
        events = gw.stream(hi())
    assert [e["choices"][0]["delta"] for e in events[:-1]] == [{"content": "ok"}]


def test_sse_events_are_compact_utf8_json():
    with gateway() as gw:
        gw.llm.stream = sse(chunk({"content": "Café ☕"}))
        response = gw.chat(hi(stream=True))
        raw = response.text
    assert response.headers["cache-control"] == "no-cache"  # proxies must not buffer or cache the stream
    first = raw.split("\n\n")[0]
    assert first.startswith('data: {"id":"chatcmpl-upstream","object":"chat.completion.chunk",')
    assert "Café ☕" in first and ", " not in first.replace("Café ☕", "")


def test_error_events_keep_non_ascii_as_is():
    with gateway() as gw:
        message = "prompt has 9000 tokens – too many"
        gw.llm.stream = sse(chunk({"content": "a"}), json.dumps({"error": {"message": message, "code": 400}}))
        raw = gw.chat(hi(stream=True)).text
    assert message in raw


def test_upstream_choices_without_index_or_choices():
    with gateway() as gw:
        reply = completion("x")
        del reply["choices"][0]["index"]
        gw.llm.reply = reply
        assert gw.chat(hi()).json()["choices"][0]["index"] == 0
        gw.llm.reply = {k: v for k, v in completion("x").items() if k != "choices"}
        assert gw.chat(hi()).json()["choices"] == []
        no_index = chunk({"content": "a"})
        del no_index["choices"][0]["index"]
        gw.llm.stream = sse(no_index, {k: v for k, v in chunk({"content": "b"}).items() if k != "choices"})
        events = gw.stream(hi())
    assert events[0]["choices"][0]["index"] == 0 and events[1]["choices"] == []
