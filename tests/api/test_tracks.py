"""One gateway for several tracks: each track's own prefix, and /v1 routing by model name."""

from __future__ import annotations

import pytest

from tests.api.harness import gateway


def hi(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def test_each_prefix_reaches_its_own_track():
    with gateway("a", "b") as gw:
        assert gw.chat(hi(), prefix="/a/v1").status_code == 200
        assert gw.chat(hi(), prefix="/b/v1").status_code == 200
        a, b = gw.tracks["a"].llm, gw.tracks["b"].llm
        assert [r["model"] for r in a.requests] == ["track_a_model"]
        assert [r["model"] for r in b.requests] == ["track_b_model"]
        # each track keeps its own reasoning default
        assert (a.body["chat_template_kwargs"], b.body["chat_template_kwargs"]) == (
            {"thinking": False},
            {"thinking": True},
        )


@pytest.mark.parametrize(
    ("model", "track"),
    [(None, "a"), ("track_a_model", "a"), ("track_b_model", "b"), ("HyperCLOVAX-SEED-Omni-8B", "b")],
)
def test_v1_routes_by_model_name(model, track):
    with gateway("a", "b") as gw:
        assert gw.chat(hi(model=model) if model else hi(), prefix="/v1").status_code == 200
        assert [t for t, fakes in gw.tracks.items() if fakes.llm.requests] == [track]


def test_the_default_track_is_configurable():
    with gateway("a", "b", default_track="b") as gw:
        gw.chat(hi(), prefix="/v1")
        assert gw.tracks["b"].llm.requests and not gw.tracks["a"].llm.requests


def test_an_unknown_model_on_v1_names_every_served_model():
    with gateway("a", "b") as gw:
        response = gw.chat(hi(model="gpt-4o"), prefix="/v1")
        error = response.json()["error"]
    assert response.status_code == 404 and error["param"] == "model"
    assert (
        error["message"] == "The model 'gpt-4o' does not exist; this endpoint serves 'track_a_model', 'track_b_model'."
    )


def test_a_track_prefix_refuses_the_other_tracks_model():
    with gateway("a", "b") as gw:
        response = gw.chat(hi(model="track_b_model"), prefix="/a/v1")
        assert response.status_code == 404
        assert not gw.tracks["b"].llm.requests and not gw.tracks["a"].llm.requests


def test_models():
    with gateway("a", "b") as gw:
        assert [m["id"] for m in gw.http.get("/v1/models").json()["data"]] == ["track_a_model", "track_b_model"]
        assert [m["id"] for m in gw.http.get("/a/v1/models").json()["data"]] == ["track_a_model"]
        assert [m["id"] for m in gw.http.get("/b/v1/models").json()["data"]] == ["track_b_model"]


def test_audio_goes_to_track_b_only():
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    body = {"model": "track_a_model", "messages": [{"role": "user", "content": [audio]}]}
    with gateway("a", "b") as gw:
        response = gw.chat(body, prefix="/v1")
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_content_type"
        assert gw.chat({**body, "model": "track_b_model"}, prefix="/v1").status_code == 200
        assert gw.tracks["b"].audio.calls == 1 and gw.tracks["a"].audio.calls == 0


def test_streaming_through_v1():
    with gateway("a", "b") as gw:
        events = gw.stream(hi(model="track_b_model"), prefix="/v1")
    assert events[-1] == "[DONE]" and events[0]["model"] == "track_b_model"
