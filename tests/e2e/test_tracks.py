"""Both tracks end to end, through one served bento (gateway, both tracks' encoders and vLLM engines on the
embedded default models), with the official `openai` SDK. Every test runs on each track."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MEDIA_REQUESTS, data_url, make_png
from tests.e2e.helpers import (
    CONTENT_CHANGE,
    HEALTHY,
    MODELS,
    PLAIN,
    REASONING,
    SAME_INPUT,
    ask,
    client_for,
    image_url,
    logprob_distance,
    merged,
    metric,
    reasoning_of,
    text,
    user,
)

pytestmark = pytest.mark.e2e

TRACKS = ["a", "b"]
LOGPROBS = {"logprobs": True, "top_logprobs": 5}


@pytest.fixture(params=TRACKS)
def track(request):
    return request.param


@pytest.fixture
def client(server, track):
    """The track's own prefix (/a/v1, /b/v1), as OmniServe's clients use it."""
    return client_for(f"{server.url}/{track}/v1")


@pytest.fixture
def v1(server):
    return client_for(f"{server.url}/v1")


def test_ready_in_time(server):
    # target: <= 120 s on 2 cores (measured by benchmarks/bench_deployment.py); a loaded CI box gets slack
    assert server.ready_after_s < 360


def test_models(client, v1, track):
    assert [m.id for m in client.models.list().data] == [MODELS[track]]
    assert [m.id for m in v1.models.list().data] == [MODELS["a"], MODELS["b"]]


def test_text(client, v1, track):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = ask(client, question, model=MODELS[track], **PLAIN[track])
    assert "Paris" in answer.choices[0].message.content
    assert reasoning_of(answer.choices[0].message) is None
    assert answer.model == MODELS[track] and answer.usage.completion_tokens > 0
    # /v1 takes either model by name: the same engine, the same answer
    via_v1 = ask(v1, question, model=MODELS[track], **PLAIN[track])
    assert via_v1.choices[0].message.content == answer.choices[0].message.content


def test_reasoning(client, track):
    reasoned = ask(client, [{"role": "user", "content": "What is 3 + 4?"}], model=MODELS[track], **REASONING[track])
    assert reasoning_of(reasoned.choices[0].message)


def test_thinking_budget(client, track):
    budget = 8
    options = merged(REASONING[track], {"extra_body": {"thinking_token_budget": budget, "min_tokens": 40}})
    response = ask(
        client, [{"role": "user", "content": "What is 3 + 4?"}], model=MODELS[track], max_tokens=48, **options
    )
    message = response.choices[0].message
    assert reasoning_of(message) and message.content
    assert len(reasoning_of(message).split()) <= budget + 1  # the budget is in tokens; words are never more than tokens


def test_image_url_and_data_url_are_the_same_image(client, track, media_server):
    base, root = media_server
    question = text("Describe this image.")
    options = merged(PLAIN[track], LOGPROBS)
    by_url = ask(client, [user(image_url(f"{base}/red.png"), question)], model=MODELS[track], **options)
    by_data = ask(
        client, [user(image_url(data_url((root / "red.png").read_bytes())), question)], model=MODELS[track], **options
    )
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert logprob_distance(by_url, by_data) <= SAME_INPUT
    # asked again, the gateway revalidates what it downloaded (the file server sends Last-Modified): a 304, no body
    seen = len(MEDIA_REQUESTS)
    again = ask(client, [user(image_url(f"{base}/red.png"), question)], model=MODELS[track], **options)
    assert again.choices[0].message.content == by_url.choices[0].message.content
    assert MEDIA_REQUESTS[seen:] == [("/red.png", 304)]
    no_image = ask(client, [user(question)], model=MODELS[track], max_tokens=1, **PLAIN[track])
    # a 64x48 image becomes a 2x2 grid of merged patches (4 rows; on track B also 16 TA-Tok codes) and its markers
    assert by_url.usage.prompt_tokens >= no_image.usage.prompt_tokens + {"a": 4, "b": 20}[track]


def test_different_images_give_different_answers(client, track, media_server):
    base, _ = media_server
    question = text("What colour dominates?")
    options = merged(PLAIN[track], LOGPROBS, {"max_tokens": 4})
    red = ask(client, [user({"type": "image", "image": f"{base}/red.png"}, question)], model=MODELS[track], **options)
    green = make_png(64, 48, (20, 200, 20))  # the same size as red.png: the same prompt length, other pixels
    other = ask(client, [user(image_url(data_url(green)), question)], model=MODELS[track], **options)
    assert red.usage.prompt_tokens == other.usage.prompt_tokens
    assert logprob_distance(red, other) > CONTENT_CHANGE


def test_two_images(client, track, media_server):
    base, _ = media_server
    one = ask(
        client,
        [user(image_url(f"{base}/red.png"), text("Compare."))],
        model=MODELS[track],
        max_tokens=1,
        **PLAIN[track],
    )
    two = ask(
        client,
        [user(image_url(f"{base}/red.png"), image_url(f"{base}/blue.png"), text("Compare."))],
        model=MODELS[track],
        **PLAIN[track],
    )
    assert two.choices[0].message.content
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_video_file_and_frame_list(client, track, media_server):
    base, _ = media_server
    question = text("What happens in this video?")
    clip = ask(
        client,
        [user({"type": "video_url", "video_url": {"url": f"{base}/clip.mp4"}}, question)],
        model=MODELS[track],
        **PLAIN[track],
    )
    frames = ask(
        client,
        [user({"type": "video", "video": [f"{base}/red.png"] * 2}, question)],
        model=MODELS[track],
        **PLAIN[track],
    )
    no_video = ask(client, [user(question)], model=MODELS[track], max_tokens=1, **PLAIN[track])
    assert clip.choices[0].message.content and frames.choices[0].message.content
    # 3 s at 2 fps = 6 frames = 3 temporal patches of merged 112x112-budget frames, plus the video's header text
    assert clip.usage.prompt_tokens > frames.usage.prompt_tokens > no_video.usage.prompt_tokens


def test_multi_turn_reaches_the_model_whole(client, server, track):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]
    response = ask(client, messages, model=MODELS[track], **PLAIN[track])
    assert response.choices[0].message.content
    # every turn reached the model: the very prompt the LLM renders for the whole conversation sent to it directly
    direct = client_for(f"{server.llm_urls[track]}/v1")
    thinking_off = {"extra_body": {"chat_template_kwargs": {"thinking": False, "skip_reasoning": True}}}
    for dropped in (None, 0, 2):  # the whole conversation, then without the system prompt, the assistant turn
        sent = [m for i, m in enumerate(messages) if i != dropped]
        expected = ask(direct, sent, model=MODELS[track], max_tokens=1, **thinking_off)
        if dropped is None:
            assert response.usage.prompt_tokens == expected.usage.prompt_tokens
        else:
            assert response.usage.prompt_tokens > expected.usage.prompt_tokens


def test_a_follow_up_turn_reuses_the_encoding_and_the_prefix_cache(client, server, track):
    """Turn 2 resends turn 1's picture: the gateway's encoder cache answers it (no encoder call), the LLM gets the
    same embeddings, so vLLM's prefix cache serves the blocks holding the picture; the same turn with a picture
    of the same size never sent before gets no such blocks."""
    component = {"component": f"Track{track.upper()}-VisionEncoder"}
    picture, unseen = (image_url(data_url(make_png(448, 336, color))) for color in ((11, 22, 33), (33, 22, 11)))
    question = text("Describe the picture.")
    answer = ask(client, [user(picture, question)], model=MODELS[track], max_tokens=8, **PLAIN[track])

    def follow_up(image):
        turns = [user(image, question), {"role": "assistant", "content": answer.choices[0].message.content}]
        return ask(client, [*turns, user(text("And its colours?"))], model=MODELS[track], max_tokens=1, **PLAIN[track])

    hits = metric(server, "hcx_encoder_cache_hits_total", **component)
    misses = metric(server, "hcx_encoder_cache_misses_total", **component)
    again = follow_up(picture)
    assert metric(server, "hcx_encoder_cache_hits_total", **component) == hits + 1
    assert metric(server, "hcx_encoder_cache_misses_total", **component) == misses
    # a 448x336 picture is 192 merged patches: the first 128-token block (vLLM's CPU block size) holds part of it
    assert again.usage.prompt_tokens_details.cached_tokens >= 128
    control = follow_up(unseen)
    assert control.usage.prompt_tokens == again.usage.prompt_tokens
    assert control.usage.prompt_tokens_details.cached_tokens < 128


def test_streaming_matches_non_streaming(client, track, media_server):
    base, _ = media_server
    messages = [user(image_url(f"{base}/red.png"), text("Describe this image."))]
    full = ask(client, messages, model=MODELS[track], max_tokens=20, **PLAIN[track]).choices[0].message.content
    chunks = list(
        ask(
            client,
            messages,
            model=MODELS[track],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            **PLAIN[track],
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[0].choices[0].delta.role == "assistant"


def test_streaming_reasoning(client, track):
    options = merged(REASONING[track], {"extra_body": {"thinking_token_budget": 6, "min_tokens": 30}})
    chunks = list(
        ask(
            client,
            [{"role": "user", "content": "What is 3 + 4?"}],
            model=MODELS[track],
            max_tokens=30,
            stream=True,
            **options,
        )
    )
    reasoning = "".join(reasoning_of(c.choices[0].delta) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning and content


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_and_a_tool_result_turn(client, track):
    # the tiny model rarely calls tools; what must hold is that tool requests and tool-result turns are served
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = ask(client, [question], model=MODELS[track], tools=[WEATHER_TOOL], **PLAIN[track])
    assert first.choices[0].message.content or first.choices[0].message.tool_calls
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"},
    ]
    second = ask(client, history, model=MODELS[track], tools=[WEATHER_TOOL], **PLAIN[track])
    assert second.choices[0].message.content is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_n_choices(client, track):
    response = ask(
        client,
        [{"role": "user", "content": "Say a colour."}],
        model=MODELS[track],
        n=2,
        temperature=1.0,
        max_tokens=8,
        **PLAIN[track],
    )
    assert [c.index for c in response.choices] == [0, 1]


BAD_REQUESTS = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [user({"type": "hologram", "hologram": "x"})]}, 400, "messages[0].content[0]"),
    ({"messages": [user(image_url(data_url(b"definitely not an image")))]}, 400, "messages[0].content[0]"),
    ({"messages": [user(image_url("http://127.0.0.1:9/nothing.png"))]}, 400, "messages[0].content[0]"),
    ({"messages": [user(*[image_url(data_url(make_png()))] * 9)]}, 400, "messages"),
    ({"messages": [user(image_url(data_url(make_png(8000, 7000))))]}, 413, "messages[0].content[0]"),
    (
        {"messages": [user({"type": "video_url", "video_url": {"url": data_url(b"nope", "video/mp4")}})]},
        400,
        "messages[0].content[0]",
    ),
    ({"messages": [user({"type": "video", "video": [image_url("x")]})]}, 400, "messages[0].content[0].video[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error(server, track, body, status, param):
    url = f"{server.url}/{track}/v1/chat/completions"
    response = httpx.post(url, json={"model": MODELS[track], **body}, headers=server.headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in response.text


def test_broken_json_and_unreachable_url_via_sdk(server, client, track):
    url = f"{server.url}/{track}/v1/chat/completions"
    response = httpx.post(url, content=b"{not json", headers=server.headers, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, [user(image_url("http://127.0.0.1:9/x.png"), text("?"))], model=MODELS[track])
    assert info.value.body["code"] == "unreachable_url"


def test_still_healthy_after_bad_input(server, client, track):
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=10).json() == HEALTHY
    assert (
        ask(client, [{"role": "user", "content": "Hi!"}], model=MODELS[track], max_tokens=4, **PLAIN[track])
        .choices[0]
        .finish_reason
    )


def test_metrics(server):
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 401  # behind the key, like the API
    response = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=10)
    assert response.status_code == 200 and "bentoml" in response.text
