"""What reaches vLLM: the exact body the gateway sends for a client's request (both tracks)."""

from __future__ import annotations

import pytest

from tests.api.harness import gateway

TRACKS = ["a", "b"]
SERVED = {"a": "track_a_model", "b": "track_b_model"}


def hi(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


# every sampling/decoding field a client may set, with a value that differs from any default
PASSTHROUGH = {
    "temperature": 0.3,
    "top_p": 0.9,
    "top_k": 7,
    "min_p": 0.05,
    "min_tokens": 2,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "seed": 1234,
    "stop": ["\n\n", "END"],
    "n": 2,
    "logprobs": True,
    "top_logprobs": 3,
    "ignore_eos": True,
    "skip_special_tokens": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "thinking_token_budget": 64,
    "include_reasoning": False,
}


@pytest.mark.parametrize("track", TRACKS)
def test_every_sampling_field_reaches_the_llm_unchanged(track):
    with gateway(track) as gw:
        assert gw.chat(hi(**PASSTHROUGH)).status_code == 200
        sent = gw.llm.body
    for key, value in PASSTHROUGH.items():
        assert sent[key] == value, key


@pytest.mark.parametrize("track", TRACKS)
def test_unset_fields_are_not_sent(track):
    with gateway(track) as gw:
        gw.chat(hi())
        sent = gw.llm.body
    assert set(sent) == {"model", "messages", "stream", "n", "chat_template_kwargs"}
    assert sent["n"] == 1 and sent["stream"] is False


@pytest.mark.parametrize("stop", ["END", ["a"]])
def test_stop_as_string_or_list(stop):
    with gateway() as gw:
        gw.chat(hi(stop=stop))
        assert gw.llm.body["stop"] == stop


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("name", ["", None])
def test_the_llm_always_gets_the_served_model_name(track, name):
    with gateway(track) as gw:
        alias = gw.config.llm.aliases[0]
        for model in (alias, SERVED[track], name):
            body = hi() if model is None else hi(model=model)
            assert gw.chat(body).status_code == 200, model
        assert [r["model"] for r in gw.llm.requests] == [SERVED[track]] * 3


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 20}, 20),
        ({"max_completion_tokens": 20, "max_tokens": 99}, 20),  # the newer name wins
    ],
)
def test_max_tokens(fields, expected):
    with gateway() as gw:
        gw.chat(hi(**fields))
        assert gw.llm.body["max_tokens"] == expected


def test_configured_default_max_tokens_applies_only_when_the_client_sets_none():
    with gateway(**{"gateway.default_max_tokens": 77}) as gw:
        gw.chat(hi())
        gw.chat(hi(max_tokens=5))
        assert [r["max_tokens"] for r in gw.llm.requests] == [77, 5]


def test_history_is_forwarded_with_roles_names_and_tool_turns():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": "you are kind", "name": "policy"},
        {"role": "user", "content": "weather?", "name": "ada"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "need a tool"},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
    ]
    with gateway() as gw:
        assert gw.chat({"messages": messages}).status_code == 200
        sent = gw.llm.body["messages"]
    assert sent == [
        {"role": "system", "content": "be brief"},  # vLLM's templates know `system`, not `developer`
        {"role": "system", "content": "you are kind", "name": "policy"},
        {"role": "user", "content": "weather?", "name": "ada"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "need a tool"},
        {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
    ]


@pytest.mark.parametrize(
    ("track", "kwargs", "thinking"),
    [
        ("a", None, False),  # track A reasons only when asked
        ("a", {"thinking": True}, True),
        ("a", {"enable_thinking": True}, True),
        ("b", None, True),  # track B reasons unless asked not to
        ("b", {"skip_reasoning": True}, False),
        ("b", {"thinking": False}, False),
    ],
)
def test_thinking_is_always_explicit(track, kwargs, thinking):
    with gateway(track) as gw:
        gw.chat(hi(chat_template_kwargs=kwargs) if kwargs else hi())
        sent = gw.llm.body["chat_template_kwargs"]
    assert sent == {**(kwargs or {}), "thinking": thinking}


def test_a_literal_extra_body_object_is_flattened():
    with gateway() as gw:
        gw.chat(hi(extra_body={"chat_template_kwargs": {"thinking": True}, "thinking_token_budget": 9, "top_k": 3}))
        sent = gw.llm.body
    assert sent["chat_template_kwargs"] == {"thinking": True}
    assert (sent["thinking_token_budget"], sent["top_k"]) == (9, 3)
    assert "extra_body" not in sent


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (None, {"include_usage": False, "continuous_usage_stats": False}),
        ({"include_usage": True}, {"include_usage": True, "continuous_usage_stats": False}),
        ({"continuous_usage_stats": True}, {"include_usage": False, "continuous_usage_stats": True}),
        (
            {"include_usage": True, "continuous_usage_stats": True},
            {"include_usage": True, "continuous_usage_stats": True},
        ),
    ],
)
def test_stream_options(options, expected):
    with gateway() as gw:
        gw.stream(hi(stream_options=options) if options else hi())
        sent = gw.llm.body
    assert sent["stream"] is True
    assert sent["stream_options"] == expected


def test_no_stream_options_without_streaming():
    with gateway() as gw:
        gw.chat(hi(stream_options={"include_usage": True}))
        assert "stream_options" not in gw.llm.body
