"""Refusals and failures as the client sees them: status, OpenAI error object, nothing internal, and whether the
request reached the LLM."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from tests.api.harness import chunk, gateway, sse

TRACKS = ["a", "b"]


def hi(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize("track", TRACKS)
def test_unknown_model_is_a_404_naming_the_served_one(track):
    with gateway(track) as gw:
        error = error_of(gw.chat(hi(model="gpt-4o")), 404)
        assert gw.llm.requests == []
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "gpt-4o" in error["message"] and gw.config.llm.served_model_name in error["message"]


def test_n_limit():
    with gateway(**{"gateway.limits.max_n": 3}) as gw:
        assert gw.chat(hi(n=3)).status_code == 200
        error = error_of(gw.chat(hi(n=4)), 400)
        assert error["param"] == "n" and "3" in error["message"]
        assert len(gw.llm.requests) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "hologram", "hologram": "x"}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
        (hi(temperature="warm"), "temperature"),
        (hi(top_logprobs=21), "top_logprobs"),
        (hi(stream_options={"include_usage": "maybe"}), "stream_options.include_usage"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
            "messages[0].content[0].image_url.url",
        ),
    ],
)
def test_invalid_fields_are_named(body, param):
    with gateway() as gw:
        error = error_of(gw.chat(body), 400)
        assert gw.llm.requests == []
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b""])
def test_a_body_that_is_not_json(content):
    with gateway() as gw:
        error = error_of(gw.http.post("/v1/chat/completions", content=content), 400)
    assert (error["code"], error["message"]) == ("invalid_json", "the request body is not valid JSON")


@pytest.mark.parametrize("content", [b"[]", b'"hi"', b"null", b"3"])
def test_a_json_body_that_is_not_an_object(content):
    with gateway() as gw:
        error = error_of(gw.http.post("/v1/chat/completions", content=content), 400)
    assert (error["code"], error["message"]) == ("invalid_json", "the request body must be a JSON object")


# The body limit follows the media limits (inline media inflate by 4/3) plus 8 MiB for text: these overrides make
# it 8 MiB + 4 bytes.
TINY_MEDIA = {
    "media.max_images_per_request": 1,
    "media.max_image_bytes": 1,
    "media.max_videos_per_request": 1,
    "media.max_video_bytes": 1,
    "media.max_audios_per_request": 1,
    "media.max_audio_bytes": 1,
}
BODY_LIMIT = (8 << 20) + 4


def padded(size: int) -> bytes:
    body = json.dumps(hi(user="")).encode()
    return body.replace(b'"user": ""', b'"user": "' + b"x" * (size - len(body)) + b'"')


@pytest.mark.parametrize("track", TRACKS)
def test_request_body_limit(track):
    with gateway(track, **TINY_MEDIA) as gw:
        at_limit, over = padded(BODY_LIMIT), padded(BODY_LIMIT + 1)
        assert len(at_limit) == BODY_LIMIT
        assert gw.http.post("/v1/chat/completions", content=at_limit).status_code == 200
        error = error_of(gw.http.post("/v1/chat/completions", content=over), 413)
        assert error["code"] == "payload_too_large"
        # without a Content-Length (chunked), the limit holds all the same
        chunked = gw.http.post("/v1/chat/completions", content=iter([over[: 1 << 20], over[1 << 20 :]]))
        error_of(chunked, 413)
        assert len(gw.llm.requests) == 1


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    with gateway(**TINY_MEDIA) as gw:
        headers = {"content-length": str(BODY_LIMIT + 1)}
        response = gw.http.post("/v1/chat/completions", content=b"{}", headers=headers)
    # the server answers from the header alone; the body the client then sends is never read
    assert response.status_code == 413


# ---------------------------------------------------------------------------------------------- the LLM's answers
@pytest.mark.parametrize("stream", [False, True])
def test_llm_context_length_refusal_becomes_ours(stream):
    vllm_says = "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (...)."
    with gateway() as gw:
        gw.llm.status, gw.llm.error_body = 400, {"error": {"message": vllm_says}}
        error = error_of(gw.chat(hi(stream=stream)), 400)
    assert error == {
        "message": "The prompt plus max_tokens is longer than the model's context of 4096 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


@pytest.mark.parametrize(
    "message",
    [
        "1 validation error for ChatCompletionRequest\ntop_k\n  Input should be a valid integer [input_value=1e+30]",
        'Error in preprocessing: File "/opt/vllm/entrypoints/openai/serving_chat.py", line 3',
        "unexpected {'type': 'image_embeds'} in <class 'vllm.multimodal.Parser'>",
        "x" * 301,
    ],
)
def test_llm_4xx_describing_internals_is_not_relayed(message, caplog):
    with gateway() as gw, caplog.at_level(logging.INFO):
        gw.llm.status, gw.llm.error_body = 400, {"error": {"message": message, "param": "top_k"}}
        error = error_of(gw.chat(hi()), 400)
    assert error["message"] == "The model rejected the request (HTTP 400)." and error["param"] == "top_k"
    assert message[:40] in caplog.text  # the operator still sees it


@pytest.mark.parametrize("body", [{"detail": ""}, {"error": {"message": None}}, "a JSON string", [1, 2]])
def test_llm_4xx_without_a_message(body):
    with gateway() as gw:
        gw.llm.status, gw.llm.error_body = 422, body
        error = error_of(gw.chat(hi()), 400)
    assert error["message"] == "The model rejected the request (HTTP 422)."


def test_llm_4xx_with_a_body_that_is_not_json():
    with gateway() as gw:
        gw.llm.status, gw.llm.error_text = 400, "Bad Request"
        error = error_of(gw.chat(hi()), 400)
    assert error["message"] == "The model rejected the request (HTTP 400)."


def test_llm_detail_field_is_read():
    with gateway() as gw:
        gw.llm.status, gw.llm.error_body = 400, {"detail": "bad thing"}
        assert error_of(gw.chat(hi()), 400)["message"] == "bad thing"


def test_llm_404_is_a_404():
    with gateway() as gw:
        gw.llm.status, gw.llm.error_body = 404, {"error": {"message": "The model `x` does not exist."}}
        assert error_of(gw.chat(hi()), 404)["message"] == "The model `x` does not exist."
        gw.llm.error_body = {"error": {}}
        assert error_of(gw.chat(hi()), 404)["message"] == "Not found."


@pytest.mark.parametrize("stream", [False, True])
def test_llm_503_is_a_503(stream):
    with gateway() as gw:
        gw.llm.status = 503
        error = error_of(gw.chat(hi(stream=stream)), 503)
    assert error["type"] == "service_unavailable"
    assert error["message"] == "The language model is unavailable; retry shortly."


@pytest.mark.parametrize("status", [500, 502])
def test_llm_5xx_is_a_502_without_internals(status):
    with gateway() as gw:
        gw.llm.status, gw.llm.error_body = status, {"error": {"message": "CUDA error at /secret/path.py"}}
        error = error_of(gw.chat(hi()), 502)
    assert error["message"] == "The language model failed to process the request."
    assert error["type"] == "upstream_error"


def test_llm_answering_garbage_is_a_502():
    with gateway() as gw:
        gw.llm.reply = None  # not a completion at all
        malformed = "The language model returned a malformed response."
        assert error_of(gw.chat(hi()), 502)["message"] == malformed
        gw.llm.stream = "data: {not json\n\n"
        assert error_of(gw.chat(hi(stream=True)), 502)["message"] == malformed
        gw.llm.stream = sse(chunk({"content": "a"}), "[1, 2]")
        events = gw.stream(hi())
    assert events[1]["error"]["type"] == "upstream_error" and events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("failure", "status", "level"),
    [
        (httpx.ConnectError("refused"), 503, "WARNING"),  # starting or restarting: expected, not a fault
        (httpx.ReadTimeout("slow"), 504, None),
        (httpx.RemoteProtocolError("x"), 503, "ERROR"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_transport_failures(failure, status, level, stream, caplog):
    with caplog.at_level("WARNING", logger="hcxserve.gateway.llm_client"), gateway() as gw:
        gw.llm.failure = failure
        error = error_of(gw.chat(hi(stream=stream)), status)
    expected = "The language model timed out." if status == 504 else "The language model is unavailable; retry shortly."
    assert error["message"] == expected
    logged = [r.levelname for r in caplog.records if r.name == "hcxserve.gateway.llm_client"]
    assert logged == ([level] if level else [])


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (httpx.ReadError("reset"), "The language model stream was interrupted."),
        (httpx.ReadTimeout("slow"), "The language model timed out."),
    ],
)
def test_a_transport_failure_mid_stream_is_an_error_event(failure, message):
    async def upstream():
        yield f"data: {json.dumps(chunk({'content': 'Pa'}))}\n\n".encode()
        raise failure

    with gateway() as gw:
        gw.llm.stream_body = upstream
        events = gw.stream(hi())
    assert events[0]["choices"][0]["delta"]["content"] == "Pa"
    assert events[1]["error"]["message"] == message and events[2:] == ["[DONE]"]


def test_a_failure_after_the_stream_started_is_an_error_event_then_done():
    with gateway() as gw:
        gw.llm.stream = sse(
            chunk({"content": "Pa"}), json.dumps({"error": {"message": "engine died at /x.py", "code": 500}})
        )
        events = gw.stream(hi())
    assert events[0]["choices"][0]["delta"]["content"] == "Pa"
    error = events[1]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error" and "engine died" not in error["message"]
    assert events[2:] == ["[DONE]"]


def test_a_client_error_reported_inside_the_stream_keeps_its_message():
    with gateway() as gw:
        gw.llm.stream = sse(json.dumps({"error": {"message": "bad logits processor", "code": 400}}))
        response = gw.chat(hi(stream=True))
    # it came before any chunk, so it is still a proper status
    assert error_of(response, 400)["message"] == "bad logits processor"


def test_an_error_event_without_a_code_is_a_502():
    with gateway() as gw:
        gw.llm.stream = sse(chunk({"content": "a"}), json.dumps({"error": None}))
        events = gw.stream(hi())
    assert events[1]["error"]["type"] == "upstream_error"


def test_unhandled_errors_are_a_500_envelope_without_internals():
    with gateway() as gw:
        gw.llm.reply = {"choices": [{"message": {"tool_calls": [{"bogus": "/secret/path.py"}]}}]}
        error = error_of(gw.chat(hi()), 500)
    assert error["code"] == "internal_error" and "secret" not in error["message"]


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/a/v1/docs"])
def test_no_generated_docs_or_schema_routes(path):
    with gateway() as gw:
        assert gw.http.get(path).status_code == 404
