import pydantic
import pytest

from hcxserve.protocol.errors import invalid_request_from_validation
from hcxserve.protocol.openai import ChatCompletionRequest, ImagePart, ImageURLPart, TextPart


def parse(body):
    return ChatCompletionRequest.model_validate(body)


def error_of(body):
    with pytest.raises(pydantic.ValidationError) as info:
        parse(body)
    return invalid_request_from_validation(info.value.errors())


def test_string_and_part_messages():
    request = parse(
        {
            "model": "track_a_model",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                        {"type": "image", "image": "data:image/png;base64,AAAA"},
                    ],
                },
            ],
        }
    )
    parts = request.messages[1].content
    assert [type(p) for p in parts] == [TextPart, ImageURLPart, ImagePart]
    assert parts[1].image_url.url == "https://example.com/a.png"


def test_image_url_may_be_a_bare_string():
    request = parse(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}]}
    )
    assert request.messages[0].content[0].image_url.url == "http://x/y.png"


def test_literal_extra_body_is_flattened_and_wins():
    request = parse(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template_kwargs": {"thinking": False},
            "extra_body": {"chat_template_kwargs": {"thinking": True}, "thinking_token_budget": 50},
        }
    )
    assert request.reasoning(default=False) is True
    assert request.thinking_token_budget == 50


def test_reasoning_follows_the_track_default_unless_the_request_says():
    def reasoning(kwargs, default):
        return parse({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs}).reasoning(
            default=default
        )

    assert reasoning(None, False) is False and reasoning(None, True) is True
    assert reasoning({"thinking": True}, False) is True and reasoning({"enable_thinking": False}, True) is False
    assert reasoning({"skip_reasoning": True}, True) is False
    assert reasoning({"skip_reasoning": True, "thinking": True}, False) is False  # opting out wins


def test_unknown_top_level_fields_are_ignored():
    assert parse({"messages": [{"role": "user", "content": "hi"}], "store": True, "metadata": {"a": "b"}})


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"model": "m"}, "messages", "required"),
        ({"messages": "hello"}, "messages", "valid list"),
        ({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]}, "messages[0].content[0]", "hologram"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]", "type"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "user"),
        ({"messages": [{"role": "user"}]}, "messages[0]", "content"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature", "number"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", "less than or equal"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens", "greater than"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "greater than"),
        (
            {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"add_generation_prompt": False}},
            "chat_template_kwargs",
            "add_generation_prompt",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url.url",
            "required",
        ),
    ],
)
def test_bad_requests_name_the_field(body, param, fragment):
    error = error_of(body)
    assert error.status_code == 400
    assert error.param == param
    assert fragment.lower() in error.message.lower()
    envelope = error.to_dict()["error"]
    assert set(envelope) == {"message", "type", "param", "code"}
    assert envelope["type"] == "invalid_request_error"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_embedding_on_the_wire_is_base64_of_torch_save_of_just_its_rows(dtype):
    import base64
    import io

    import torch

    from hcxserve.protocol.payloads import encode_tensor

    batch = torch.randn(3 * 64, 32).to(getattr(torch, dtype))
    rows = batch[64:128]  # one item's rows of a batch output: a view into the batch's storage
    wire = encode_tensor(rows)
    raw = base64.b64decode(wire, validate=True)  # standard base64, as vLLM decodes it
    assert torch.equal(torch.load(io.BytesIO(raw), weights_only=True), rows)
    alone = io.BytesIO()
    torch.save(rows.clone(), alone)
    assert len(raw) == len(alone.getvalue())  # the item's rows only, not the whole batch's storage
