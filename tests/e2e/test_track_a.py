"""Track A end to end, beyond what every track does (tests/e2e/test_tracks.py): its answers about images and
videos equal those of vLLM running the whole unified VLM from pixels, and OmniServe's literal `extra_body`."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import data_url, make_photo, make_video
from tests.e2e.helpers import MODELS, SAME_INPUT, ask, client_for, image_url, logprob_distance, text, user

pytestmark = pytest.mark.e2e

MODEL = MODELS["a"]
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
def test_media_answers_equal_the_whole_vlm(server, whole_vlm, part):
    messages = [user(part, text("Describe this in detail."))]
    options = {"max_tokens": 16, "logprobs": True, "top_logprobs": 5}
    bento = ask(client_for(f"{server.url}/a/v1"), messages, model=MODEL, **options)
    same_generation(bento, ask(client_for(f"{whole_vlm.url}/v1"), messages, model=MODEL, **options))


def test_thinking_in_a_literal_extra_body_object(server):
    # OmniServe's curl examples send "extra_body" as a JSON key; the gateway flattens it
    body = {
        "model": MODEL,
        "max_tokens": 24,
        "min_tokens": 20,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "What is 3 + 4?"}],
        "extra_body": {"chat_template_kwargs": {"thinking": True}, "thinking_token_budget": 4},
    }
    message = httpx.post(f"{server.url}/a/v1/chat/completions", json=body, headers=server.headers, timeout=300).json()
    assert message["choices"][0]["message"]["reasoning_content"]
