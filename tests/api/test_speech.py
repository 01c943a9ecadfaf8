"""Spoken answers (track B): what the LLM is asked for, and how its output becomes OpenAI's `message.audio`."""

from __future__ import annotations

import base64
import time

import pytest

from hcxserve.protocol.payloads import UNKNOWN_VOICE, SpeechAudio
from tests.api.harness import completion, gateway

SPOKEN = (
    "\n<assistant_transcript>Hello there.</assistant_transcript>\n<audio_decoder_call>\n"
    "<|discrete_audio_start|><|audio0012|><|audio0013|><|discrete_audio_end|>"
)
SPEAK = {"modalities": ["text", "audio"]}


def ask(**fields):
    return {"messages": [{"role": "user", "content": "Say hello."}], **fields}


def test_the_llm_is_asked_for_speech_and_its_units_are_spoken():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        response = gw.chat(ask(**SPEAK, audio={"voice": "mhwj", "format": "mp3"}))
        assert response.status_code == 200, response.text
        body = gw.llm.body
        (request,) = gw.tracks["b"].speech.requests
    assert body["skip_special_tokens"] is False
    max_units = gw.config.components.audio_decoder.max_units
    assert body["vllm_xargs"] == {"hcx_output": "speech", "hcx_max_units": max_units, "hcx_max_text_tokens": 512}
    assert body["chat_template_kwargs"] == {"thinking": False, "skip_reasoning": True}  # no think block to hold units
    assert (request.units, request.voice, request.format) == ([12, 13], "mhwj", "mp3")
    message = response.json()["choices"][0]["message"]
    assert message["content"] == "Hello there."
    audio = message["audio"]
    assert base64.b64decode(audio["data"]) == b"mp3:mhwj:[12, 13]"
    assert audio["transcript"] == "Hello there." and audio["id"].startswith("audio_")
    assert abs(audio["expires_at"] - (time.time() + 3600)) < 60


@pytest.mark.parametrize("max_tokens, text, units", [(64, 6, 56), (10, 1, 7), (100_000, 512, 2000)])
def test_the_formats_bounds_fit_the_token_budget(max_tokens, text, units):
    with gateway("b", **{"llm.max_model_len": 200_000}) as gw:
        gw.llm.reply = completion(SPOKEN)
        assert gw.chat(ask(**SPEAK, max_tokens=max_tokens)).status_code == 200
        xargs = gw.llm.body["vllm_xargs"]
    assert (xargs["hcx_max_text_tokens"], xargs["hcx_max_units"]) == (text, units)


def test_every_choice_is_spoken_in_one_call_with_the_default_voice_and_format():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        gw.llm.reply["choices"].append({**gw.llm.reply["choices"][0], "index": 1})
        choices = gw.chat(ask(**SPEAK, n=2)).json()["choices"]
        speech = gw.tracks["b"].speech
    assert len(speech.requests) == 2 and {(r.voice, r.format) for r in speech.requests} == {(None, "wav")}
    assert all(c["message"]["audio"]["transcript"] == "Hello there." for c in choices)


def test_text_only_requests_are_left_alone():
    with gateway("b") as gw:
        gw.llm.reply = completion("Hello.")
        message = gw.chat(ask()).json()["choices"][0]["message"]
        assert "vllm_xargs" not in gw.llm.body and "skip_special_tokens" not in gw.llm.body
    assert "audio" not in message and message["content"] == "Hello."


def test_an_answer_cut_before_its_units_is_text_only():
    with gateway("b") as gw:
        gw.llm.reply = completion("<assistant_transcript>Hello th")
        message = gw.chat(ask(**SPEAK)).json()["choices"][0]["message"]
        assert gw.tracks["b"].speech.requests == []
    assert message["content"] == "Hello th" and "audio" not in message


@pytest.mark.parametrize(
    "track, fields, param",
    [
        ("a", SPEAK, "modalities"),  # track A has no audio decoder
        ("b", {**SPEAK, "stream": True}, "stream"),
        ("b", {**SPEAK, "audio": {"format": "wma"}}, "audio.format"),
        ("b", {"modalities": ["text", "video"]}, "modalities[1]"),
    ],
)
def test_what_cannot_be_spoken_is_refused_before_the_llm(track, fields, param):
    with gateway(track) as gw:
        response = gw.chat(ask(**fields))
        assert gw.llm.requests == []
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_an_unknown_voice_is_a_400_naming_it_and_a_failed_decode_a_502():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        error = "unknown speaker 'nobody' (known: fkms, mhwj)"
        gw.tracks["b"].speech.results = lambda items: [SpeechAudio(error=error, status=UNKNOWN_VOICE)]
        response = gw.chat(ask(**SPEAK, audio={"voice": "nobody"}))
        assert response.status_code == 400 and response.json()["error"]["param"] == "audio.voice"
        # units the decoder cannot take are the model's doing, whatever the voice's name has in common with them
        gw.tracks["b"].speech.results = lambda items: [SpeechAudio(error="unit 7000 at position 0", status=400)]
        response = gw.chat(ask(**SPEAK, audio={"voice": "0"}))
    assert response.status_code == 502 and "could not speak" in response.json()["error"]["message"]
