"""Track A end to end: the official `openai` SDK against a real multi-process `bentoml serve` (gateway, vision
encoder and vLLM on the embedded default model)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import data_url, make_photo, make_png, make_video
from tests.e2e.helpers import CONTENT_CHANGE, SAME_INPUT, logprob_distance

pytestmark = pytest.mark.e2e

MODEL = "track_a_model"
GREEDY = {"temperature": 0.0, "seed": 0}


@pytest.fixture(scope="module")
def client(track_a_server):
    return openai.OpenAI(base_url=f"{track_a_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client_a(track_a_server):
    return openai.OpenAI(base_url=f"{track_a_server.url}/a/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, **{"max_tokens": 24, **GREEDY, **kwargs})


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(value):
    return {"type": "text", "text": value}


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_ready_fast_enough(track_a_server):
    # issue target: ready in <= 90 s on 2 cores; a loaded CI box gets slack, the figure is in the README
    assert track_a_server.ready_after_s < 240


def test_models(client, client_a):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert [m.id for m in client_a.models.list().data] == [MODEL]


def test_text_only(client):
    response = ask(client, [{"role": "user", "content": "What is the capital of France?"}])
    answer = response.choices[0].message.content
    assert answer and "Paris" in answer
    assert response.choices[0].message.model_extra.get("reasoning_content") is None
    assert response.usage.completion_tokens > 0 and response.model == MODEL


def test_image_url_and_data_url_give_the_same_answer(client, media_server):
    base, root = media_server
    question = text("Describe this image.")
    by_url = ask(client, [user(image_url(f"{base}/red.png"), question)])
    by_data = ask(client, [user(image_url(data_url((root / "red.png").read_bytes())), question)])
    assert by_url.choices[0].message.content
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    no_image = ask(client, [user(question)], max_tokens=1)
    # a 64x48 image becomes a 2x2 grid of merged patches: 4 image rows plus the mime header around them
    assert by_url.usage.prompt_tokens >= no_image.usage.prompt_tokens + 4


def test_image_part_form_and_different_images_differ(client, media_server):
    base, root = media_server
    question = text("What colour dominates?")
    options = {"logprobs": True, "top_logprobs": 5, "max_tokens": 4}
    red = ask(client, [user({"type": "image", "image": f"{base}/red.png"}, question)], **options)
    red_again = ask(client, [user(image_url(data_url((root / "red.png").read_bytes())), question)], **options)
    green = make_png(64, 48, (20, 200, 20))  # the same size as red.png: the same prompt length, other pixels
    other = ask(client, [user(image_url(data_url(green)), question)], **options)
    assert red.usage.prompt_tokens == other.usage.prompt_tokens
    assert logprob_distance(red, red_again) <= SAME_INPUT
    assert logprob_distance(red, other) > CONTENT_CHANGE


def test_two_images(client, media_server):
    base, _ = media_server
    one = ask(client, [user(image_url(f"{base}/red.png"), text("Compare."))], max_tokens=1)
    two = ask(client, [user(image_url(f"{base}/red.png"), image_url(f"{base}/blue.png"), text("Compare."))])
    assert two.choices[0].message.content
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_video_url_and_frame_list(client, media_server):
    base, _ = media_server
    question = text("What happens in this video?")
    clip = ask(client, [user({"type": "video_url", "video_url": {"url": f"{base}/clip.mp4"}}, question)])
    frames = ask(client, [user({"type": "video", "video": [f"{base}/red.png", f"{base}/red.png"]}, question)])
    no_video = ask(client, [user(question)], max_tokens=1)
    assert clip.choices[0].message.content and frames.choices[0].message.content
    # 3 s at 2 fps = 6 frames = 3 temporal patches of merged 112x112-budget frames, plus the video's header text
    assert clip.usage.prompt_tokens > frames.usage.prompt_tokens > no_video.usage.prompt_tokens


# The bento (VisionEncoder service -> embeddings -> vLLM applying the projector) against vLLM running the whole
# unified VLM from pixels: the same answer proves the media's content, not just its shape, reaches the model through
# the right tower, preprocessing and projector weights. The two towers are two implementations of the same fp32
# network whose float sums differ in order, so greedy tokens may only part ways where the model itself is undecided.
NEAR_TIE = 0.05  # nats: a top-2 gap this small may flip on float noise


def same_generation(bento, reference) -> None:
    assert bento.usage.prompt_tokens == reference.usage.prompt_tokens  # the same placeholder expansion
    assert logprob_distance(reference, bento) <= SAME_INPUT
    ours, theirs = bento.choices[0].logprobs.content, reference.choices[0].logprobs.content
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a.token != b.token:
            gap = b.top_logprobs[0].logprob - b.top_logprobs[1].logprob
            assert gap < NEAR_TIE, f"token {i}: {a.token!r} vs {b.token!r}, reference top-2 gap {gap:.4f}"
            return


@pytest.fixture(scope="module")
def reference(whole_vlm):
    return openai.OpenAI(base_url=f"{whole_vlm.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize(
    "part",
    [
        image_url(data_url(make_photo(448, 336))),
        {
            "type": "video_url",
            "video_url": {"url": data_url(make_video(seconds=2, fps=2, width=112, height=112), "video/mp4")},
        },
    ],
    ids=["image", "video"],
)
def test_media_answers_equal_the_whole_vlm(client, reference, part):
    messages = [user(part, text("Describe this in detail."))]
    options = {"max_tokens": 16, "logprobs": True, "top_logprobs": 5}
    same_generation(ask(client, messages, **options), ask(reference, messages, **options))


def test_multi_turn_with_system_prompt(client_a, track_a_server):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
        {"role": "user", "content": "What is my name?"},
    ]
    response = ask(client_a, messages)
    assert response.choices[0].message.content
    # every turn reached the model: the very prompt the LLM renders for the whole conversation sent to it directly
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{track_a_server.llm_port}/v1", api_key="-", max_retries=0)
    for dropped in (None, 0, 2):  # the whole conversation, then without the system prompt, the assistant turn
        sent = [m for i, m in enumerate(messages) if i != dropped]
        expected = ask(direct, sent, max_tokens=1, extra_body={"chat_template_kwargs": {"thinking": False}})
        if dropped is None:
            assert response.usage.prompt_tokens == expected.usage.prompt_tokens
        else:
            assert response.usage.prompt_tokens > expected.usage.prompt_tokens


def test_reasoning_with_budget(client):
    budget = 8
    response = ask(
        client,
        [{"role": "user", "content": "What is 3 + 4?"}],
        max_tokens=48,
        extra_body={"chat_template_kwargs": {"thinking": True}, "thinking_token_budget": budget, "min_tokens": 40},
    )
    message = response.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content
    assert len(reasoning.split()) <= budget + 1  # the budget is in tokens; words are never more than tokens


def test_thinking_in_a_literal_extra_body_object(track_a_server):
    # OmniServe's curl examples send "extra_body" as a JSON key; the gateway flattens it
    body = {
        "model": MODEL,
        "max_tokens": 24,
        "min_tokens": 20,
        **GREEDY,
        "messages": [{"role": "user", "content": "What is 3 + 4?"}],
        "extra_body": {"chat_template_kwargs": {"thinking": True}, "thinking_token_budget": 4},
    }
    message = httpx.post(f"{track_a_server.url}/a/v1/chat/completions", json=body, timeout=300).json()
    assert message["choices"][0]["message"]["reasoning_content"]


def test_streaming_matches_non_streaming(client, media_server):
    base, _ = media_server
    messages = [user(image_url(f"{base}/red.png"), text("Describe this image."))]
    full = ask(client, messages, max_tokens=20).choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[0].choices[0].delta.role == "assistant"


def test_streaming_reasoning(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is 3 + 4?"}],
            max_tokens=30,
            stream=True,
            extra_body={"chat_template_kwargs": {"thinking": True}, "thinking_token_budget": 6, "min_tokens": 30},
            **GREEDY,
        )
    )
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
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


def test_tools_and_a_tool_result_turn(client):
    # the tiny model rarely calls tools; what must hold is that tool requests and tool-result turns are served
    first = ask(client, [{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER_TOOL])
    assert first.choices[0].message.content or first.choices[0].message.tool_calls
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"},
    ]
    second = ask(client, history, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_n_choices(client):
    response = ask(client, [{"role": "user", "content": "Say a colour."}], n=2, temperature=1.0, max_tokens=8)
    assert [c.index for c in response.choices] == [0, 1]


BAD_REQUESTS = [
    ({"messages": []}, 400, "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "hologram", "hologram": "x"}]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        {"messages": [{"role": "user", "content": [image_url(data_url(b"definitely not an image"))]}]},
        400,
        "messages[0].content[0]",
    ),
    (
        {"messages": [{"role": "user", "content": [image_url("http://127.0.0.1:9/nothing.png")]}]},
        400,
        "messages[0].content[0]",
    ),
    ({"messages": [{"role": "user", "content": [image_url(data_url(make_png()))] * 9}]}, 400, "messages"),
    (
        {"messages": [{"role": "user", "content": [image_url(data_url(make_png(8000, 7000)))]}]},
        413,
        "messages[0].content[0]",
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video_url", "video_url": {"url": data_url(b"nope", "video/mp4")}}],
                }
            ]
        },
        400,
        "messages[0].content[0]",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "video", "video": [image_url("x")]}]}]},
        400,
        "messages[0].content[0].video[0]",
    ),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error(track_a_server, body, status, param):
    response = httpx.post(f"{track_a_server.url}/v1/chat/completions", json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in response.text


def test_broken_json_and_unreachable_url_via_sdk(track_a_server, client):
    response = httpx.post(f"{track_a_server.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, [user(image_url("http://127.0.0.1:9/x.png"), text("?"))])
    assert info.value.body["code"] == "unreachable_url"


def test_still_healthy_after_bad_input(track_a_server, client):
    assert httpx.get(f"{track_a_server.url}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{track_a_server.url}/health", timeout=10).json() == {"status": "ok"}
    assert ask(client, [{"role": "user", "content": "Hi!"}], max_tokens=4).choices[0].message.content


def test_metrics(track_a_server):
    response = httpx.get(f"{track_a_server.url}/metrics", timeout=10)
    assert response.status_code == 200 and "bentoml" in response.text
