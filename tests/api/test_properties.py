"""Property-based: whatever JSON a client sends to the chat route, the gateway answers below 500, and every refusal
is an OpenAI error object. Bodies are drawn from the request model's own fields (so most get past the first
checks and reach deeper code) with values of any JSON type, size and nesting, in place of the right ones."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hcxserve.protocol.openai import ChatCompletionRequest
from tests.api.harness import gateway
from tests.conftest import data_url, make_png

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
PART_TYPES = ["text", "image_url", "image", "video_url", "video", "input_audio", "audio_url", "hologram"]
urls = st.sampled_from(
    ["http://media.test/x.png", "ftp://x/y", "data:image/png;base64,", data_url(make_png()), "", "http://[::1/x",
     "file:///etc/passwd", "aGVsbG8="]
)  # fmt: skip
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(PART_TYPES)},
    optional={
        "text": st.text(max_size=30) | json_values,
        "image_url": st.fixed_dictionaries({"url": urls}) | urls | json_values,
        "image": urls | json_values,
        "video_url": st.fixed_dictionaries({"url": urls}) | json_values,
        "video": urls | st.lists(urls, max_size=3) | json_values,
        "input_audio": st.fixed_dictionaries({"data": urls | st.text(max_size=20)}, optional={"format": st.text()}),
        "audio_url": st.fixed_dictionaries({"url": urls}),
        "fps": json_values,
        "max_pixels": json_values,
    },
)
plain_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=40)}),
    min_size=1,
    max_size=3,
)
messages = plain_messages | st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"])},
        optional={
            "content": st.text(max_size=40) | st.lists(parts, max_size=3) | json_values,
            "name": st.text(max_size=10) | json_values,
            "tool_call_id": st.text(max_size=10) | json_values,
            "tool_calls": st.lists(json_values, max_size=2) | json_values,
            "reasoning_content": st.text(max_size=10) | json_values,
        },
    ),
    min_size=0,
    max_size=4,
)
FIELDS = sorted(set(ChatCompletionRequest.model_fields) - {"messages"}) + ["extra_body"]
# values each sampling field may hold, so that a share of the bodies is served and the whole pipeline runs
VALID_FIELDS = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "min_p": st.floats(0, 1), "top_k": st.integers(-1, 50),
    "max_tokens": st.integers(1, 64), "n": st.integers(1, 2), "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": st.text(max_size=8) | st.lists(st.text(max_size=8), max_size=3), "stream": st.booleans(),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "include_reasoning": st.booleans(), "user": st.text(max_size=8),
}  # fmt: skip
bodies = (
    st.fixed_dictionaries({"messages": plain_messages}, optional=VALID_FIELDS)
    | st.fixed_dictionaries(
        {"messages": messages | json_values},
        optional={name: json_values for name in FIELDS},
    )
    | json_values
)


OUTCOMES: Counter = Counter()  # statuses seen (all, and by track), so the last test can check the run was not vacuous


@pytest.fixture(scope="module")
def gw():
    with gateway("a", "b") as gw:
        yield gw


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, track=st.sampled_from(["a", "b"]))
def test_no_json_body_gets_a_5xx(gw, body, track):
    response = gw.http.post(f"/{track}/v1/chat/completions", json=body)
    OUTCOMES[response.status_code] += 1
    OUTCOMES[(track, response.status_code)] += 1
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_the_generated_bodies_reach_every_outcome(gw):
    """Runs after the property: some bodies were served (they reached the fake LLM) and some were refused."""
    assert OUTCOMES[200] >= 40 and OUTCOMES[400] >= 100, OUTCOMES
    assert OUTCOMES["a", 200] and OUTCOMES["b", 200], OUTCOMES
