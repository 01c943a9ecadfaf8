"""The encoder cache through the gateway: a conversation that resends its media every turn is encoded once, the
LLM gets the same embeddings every turn, and what a URL serves is fetched again each time."""

from __future__ import annotations

import pytest

from hcxserve.protocol.payloads import VisionEmbedding, VisionEncoding
from tests.api.harness import gateway
from tests.conftest import data_url, make_audio, make_png

RED, GREEN = make_png(color=(200, 30, 30)), make_png(color=(30, 200, 30))
WAV = make_audio(0.5)
URL = "https://img.test/photo.png"


def media_turn(track: str) -> list[dict]:
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": URL}},
        {"type": "image_url", "image_url": {"url": data_url(GREEN)}},
    ]
    if track == "b":
        parts.append({"type": "input_audio", "input_audio": {"data": data_url(WAV, "audio/wav"), "format": "wav"}})
    return parts


def conversation(track: str, turns: int) -> dict:
    messages = []
    for turn in range(turns):
        messages += [{"role": "user", "content": media_turn(track)}, {"role": "assistant", "content": f"turn {turn}"}]
    return {"messages": messages[:-1]}


def media_parts(body: dict) -> list[dict]:
    return [p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] != "text"]


@pytest.mark.parametrize("track", ["a", "b"])
def test_later_turns_reuse_the_first_turns_encodings(track):
    with gateway(track) as gw:
        gw.web.pages[URL] = RED
        for turns in (1, 2, 3):
            assert gw.chat(conversation(track, turns)).status_code == 200
        # one call per encoder, in turn 1; turns 2 and 3 hit
        assert gw.vision.calls == 1 and [i.data for i in gw.vision.images] == [RED, GREEN]
        assert gw.audio.calls == (1 if track == "b" else 0)
        assert gw.web.fetched == [URL] * 6  # the URL is fetched every time: its content may change
        first, last = media_parts(gw.llm.requests[0]), media_parts(gw.llm.requests[2])
        assert last == first * 3  # the LLM gets the very same embeddings for the same media, every turn
        caches = gw.caches
    assert (caches["vision_encoder"].hits, caches["vision_encoder"].misses) == (2 * 2 + 2 * 3, 2)


def test_new_content_behind_the_same_url_is_encoded_again():
    with gateway() as gw:
        gw.web.pages[URL] = RED
        ask = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}}]}]}
        assert gw.chat(ask).status_code == 200
        gw.web.pages[URL] = GREEN
        assert gw.chat(ask).status_code == 200
        assert [i.data for i in gw.vision.images] == [RED, GREEN]
        before, after = (media_parts(body)[0]["image_embeds"]["image_embeds"] for body in gw.llm.requests)
    assert before != after


def test_a_changed_video_option_is_encoded_again():
    video = {"type": "video_url", "video_url": {"url": data_url(b"mp4", "video/mp4")}}
    with gateway() as gw:
        for options in ({}, {"fps": 1.0}, {}, {"fps": 1.0}):
            assert gw.chat({"messages": [{"role": "user", "content": [{**video, **options}]}]}).status_code == 200
        assert [v.fps for v in gw.vision.videos] == [gw.config.media.video_fps, 1.0]


def test_malformed_results_and_refusals_are_not_kept():
    ask = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(RED)}}]}]}
    malformed = VisionEncoding(
        embedding=VisionEmbedding(embeds_b64="x", rows=999, dim=8, dtype="f", grid_thw=(1, 4, 4))
    )
    with gateway() as gw:
        gw.vision.image_results = lambda items: [malformed]
        assert gw.chat(ask).status_code == 502
        gw.vision.image_results = lambda items: [VisionEncoding(error="cannot decode")]
        assert gw.chat(ask).status_code == 400
        gw.vision.image_results = None
        assert gw.chat(ask).status_code == 200
        assert gw.chat(ask).status_code == 200
        assert gw.vision.calls == 3  # the two failures were asked again; the success was kept


def test_a_cache_of_zero_bytes_is_off():
    ask = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(RED)}}]}]}
    with gateway(**{"components.vision_encoder.cache_bytes": 0}) as gw:
        for _ in range(2):
            assert gw.chat(ask).status_code == 200
        assert gw.vision.calls == 2 and "vision_encoder" not in gw.caches
