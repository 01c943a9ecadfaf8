"""Spoken answers (track B): what the LLM is asked for, and how its output becomes OpenAI's `message.audio`."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import zlib

import pytest

from hcxserve.gateway.speech import audio_id
from hcxserve.protocol.payloads import UNKNOWN_VOICE, SpeechAudio
from tests.api.harness import FAKE_SPEAKER, chunk, completion, fake_speech, gateway, sse
from tests.conftest import make_audio

SPOKEN = (
    "\n<assistant_transcript>Hello there.</assistant_transcript>\n<audio_decoder_call>\n"
    "<|discrete_audio_start|><|audio0012|><|audio0013|><|discrete_audio_end|>"
)
SPEAK = {"modalities": ["text", "audio"]}


def ask(**fields):
    return {"messages": [{"role": "user", "content": "Say hello."}], **fields}


def input_audio(clip: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": "wav"}}


def test_the_llm_is_asked_for_speech_and_its_units_are_spoken():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        response = gw.chat(ask(**SPEAK, audio={"voice": "mhwj", "format": "mp3"}))
        assert response.status_code == 200, response.text
        body = gw.llm.body
        (request,) = gw.tracks["b"].speech.requests
    assert body["skip_special_tokens"] is False
    max_units = gw.config.components.audio_decoder.max_units
    assert body["vllm_xargs"] == {
        "hcx_output": "speech", "hcx_min_units": 1, "hcx_max_units": max_units, "hcx_max_text_tokens": 512
    }  # fmt: skip
    assert "tool_choice" not in body
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
    with gateway("b", **{"llm.max_model_len": 200_000, "components.audio_decoder.max_units": 2000}) as gw:
        gw.llm.reply = completion(SPOKEN)
        assert gw.chat(ask(**SPEAK, max_tokens=max_tokens)).status_code == 200
        xargs = gw.llm.body["vllm_xargs"]
    assert (xargs["hcx_max_text_tokens"], xargs["hcx_max_units"]) == (text, units)


def test_min_tokens_is_the_least_number_of_units_and_tools_stay_in_the_prompt_only():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        assert gw.chat(ask(**SPEAK, min_tokens=40, max_tokens=100, tools=tools, tool_choice="auto")).status_code == 200
        body = gw.llm.body
    assert body["vllm_xargs"]["hcx_min_units"] == 40 and "min_tokens" not in body  # vLLM's would block the end
    assert body["tools"] == tools and body["tool_choice"] == "none"


def test_every_choice_is_spoken_in_one_call_with_the_default_voice_and_format():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        gw.llm.reply["choices"].append({**gw.llm.reply["choices"][0], "index": 1})
        choices = gw.chat(ask(**SPEAK, n=2)).json()["choices"]
        speech = gw.tracks["b"].speech
    assert len(speech.requests) == 2 and {(r.voice, r.format) for r in speech.requests} == {(None, "wav")}
    assert all(c["message"]["audio"]["transcript"] == "Hello there." for c in choices)


def test_units_beyond_the_decoders_limit_are_not_spoken():
    with gateway("b", **{"components.audio_decoder.max_units": 3}) as gw:
        gw.llm.reply = completion(SPOKEN.replace("<|discrete_audio_end|>", "<|audio0014|><|audio0015|>" * 2))
        assert gw.chat(ask(**SPEAK)).status_code == 200
        assert [r.units for r in gw.tracks["b"].speech.requests] == [[12, 13, 14]]


def test_a_streamed_speech_block_without_units_ends_as_text():
    with gateway("b") as gw:
        gw.llm.stream = sse(*spoken_stream([]))
        events = gw.stream(ask(**SPEAK, audio={"format": "pcm16"}))
        assert gw.tracks["b"].speech.requests == []
    assert audio_of(events)[0] == [] and events[-2]["choices"][0]["finish_reason"] == "stop"


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
        ("b", {**SPEAK, "audio": {"format": "wma"}}, "audio.format"),
        ("b", {"modalities": ["text", "video"]}, "modalities[1]"),
        ("b", {**SPEAK, "audio": {"voice": "nobody"}}, "audio.voice"),
        ("b", {**SPEAK, "audio": {"voice": "nobody"}, "stream": True}, "audio.voice"),
    ],
)
def test_what_cannot_be_spoken_is_refused_before_the_llm(track, fields, param):
    with gateway(track) as gw:
        response = gw.chat(ask(**fields))
        assert gw.llm.requests == []
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_the_decoders_voices_are_asked_once_in_a_while():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        for _ in range(3):
            assert gw.chat(ask(**SPEAK, audio={"voice": "mhwj"})).status_code == 200
        assert gw.tracks["b"].speech.voice_calls == 1
        message = gw.chat(ask(**SPEAK, audio={"voice": "x"})).json()["error"]["message"]
    assert message == "audio.voice: unknown voice 'x' (known: fkms, mhwj)"


def test_a_voice_the_decoder_lost_is_a_400_and_a_failed_decode_a_502():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        error = "unknown speaker 'mhwj' (known: fkms)"
        gw.tracks["b"].speech.results = lambda items: [SpeechAudio(error=error, status=UNKNOWN_VOICE)]
        response = gw.chat(ask(**SPEAK, audio={"voice": "mhwj"}))
        assert response.status_code == 400 and response.json()["error"]["param"] == "audio.voice"
        # units the decoder cannot take are the model's doing, whatever the voice's name has in common with them
        gw.tracks["b"].speech.results = lambda items: [SpeechAudio(error="unit 7000 at position 0", status=400)]
        response = gw.chat(ask(**SPEAK, audio={"voice": "fkms"}))
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "The audio decoder could not speak the model's answer."


def test_units_the_model_speaks_unasked_are_spoken_too():
    # OmniServe's check 9: no `modalities`; the model decides to answer in speech
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        message = gw.chat(ask()).json()["choices"][0]["message"]
        assert "vllm_xargs" not in gw.llm.body
    assert message["content"] == "Hello there." and base64.b64decode(message["audio"]["data"]) == b"wav:None:[12, 13]"


def test_the_voice_of_the_last_input_audio_is_cloned_when_the_model_or_the_request_says_so():
    spoken = SPOKEN.replace("<|discrete_audio_start|>", '<speaker_info>{"is_ref_audio": true}</speaker_info>'
                            "<|discrete_audio_start|>")  # fmt: skip
    clips = [make_audio(1.0, freq=220.0), make_audio(1.0, freq=440.0)]
    content = [*(input_audio(c) for c in clips), {"type": "text", "text": "Answer me."}]
    with gateway("b") as gw:
        for reply, fields in (
            (spoken, {}),
            (SPOKEN, {"is_ref_audio": True}),
            (SPOKEN, {"extra_body": {"is_ref_audio": True}}),
        ):
            gw.llm.reply = completion(reply)
            body = {"messages": [{"role": "user", "content": content}], **SPEAK, **fields}
            assert gw.chat(body).status_code == 200
        gw.llm.reply = completion(spoken)
        assert gw.chat(ask(**SPEAK, audio={"voice": "mhwj"})).status_code == 200  # no input audio: the voice named
        gw.llm.reply = completion(SPOKEN)
        assert gw.chat({"messages": [{"role": "user", "content": content}], **SPEAK}).status_code == 200
        requests = gw.tracks["b"].speech.requests
    assert [r.reference == clips[1] for r in requests] == [True, True, True, False, False]
    assert [r.voice for r in requests] == [None, None, None, "mhwj", None]


def test_the_original_form_gives_the_stored_files_url_as_data_and_id():
    with gateway("b", **{"gateway.storage.audio_as_url": True}) as gw:
        gw.llm.reply = completion(SPOKEN)
        audio = gw.chat(ask(**SPEAK)).json()["choices"][0]["message"]["audio"]
    assert audio["data"] == audio["id"]
    url = base64.urlsafe_b64decode(audio["data"]).decode()
    assert url == "data:audio/wav;base64," + base64.b64encode(b"wav:None:[12, 13]").decode()


# ---------------------------------------------------------------------------------------------- streamed
def spoken_stream(units: list[int], *, split: int = 7) -> list[dict]:
    """An LLM stream of a spoken answer, its text cut into deltas of `split` characters (markers split too)."""
    units_text = "".join(f"<|audio{u:04d}|>" for u in units)
    text = ("\n<assistant_transcript>Hello there.</assistant_transcript>\n<audio_decoder_call>\n"
            f"<|discrete_audio_start|>{units_text}<|discrete_audio_end|>")  # fmt: skip
    pieces = [text[i : i + split] for i in range(0, len(text), split)]
    return [chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in pieces),
            chunk({}, finish_reason="stop")]  # fmt: skip


UNITS = [(7 * i) % 100 for i in range(60)]


def audio_of(events: list) -> tuple[list[dict], bytes]:
    deltas = [
        e["choices"][0]["delta"]["audio"] for e in events[:-1] if e["choices"] and "audio" in e["choices"][0]["delta"]
    ]
    return deltas, base64.b64decode("".join(d.get("data", "") for d in deltas))


def test_a_streamed_answer_speaks_in_pcm16_parts_that_concatenate_to_the_whole():
    with gateway("b") as gw:
        gw.llm.stream = sse(*spoken_stream(UNITS))
        events = gw.stream(ask(**SPEAK, audio={"format": "pcm16"}))
        requests = gw.tracks["b"].speech.requests
    deltas, data = audio_of(events)
    assert data == fake_speech(UNITS).tobytes()
    assert deltas[0]["id"].startswith("audio_") and all("id" not in d for d in deltas[1:])
    parts = [d["data"] for d in deltas if "data" in d]
    assert len(parts) > 1 and all("=" not in p and len(base64.b64decode(p)) % 6 == 0 for p in parts[:-1])
    assert deltas[-1]["transcript"] == "Hello there." and abs(deltas[-1]["expires_at"] - time.time() - 3600) < 60
    # each part asks with all units so far from where the last one stopped; the first after 5 units
    assert len(requests[0].units) == 5 and not requests[0].final and requests[-1].final
    assert all(len(b.units) - len(a.units) >= 25 for a, b in zip(requests[:-2], requests[1:-1]))  # then every 25
    assert all(r.format == "pcm16" for r in requests)
    assert [r.start_sample for r in requests[1:]] == [960 * len(r.units) - 100 for r in requests[:-1]]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "Hello there."  # the layout around the blocks is not text
    assert all(e["choices"][0]["delta"] or e["choices"][0]["finish_reason"] for e in events[1:-1])  # none empty
    finishes = [
        (i, e["choices"][0]["finish_reason"]) for i, e in enumerate(events[:-1]) if e["choices"][0]["finish_reason"]
    ]
    assert finishes == [(len(events) - 2, "stop")]  # last, after the audio


def test_a_streamed_answer_in_a_cloned_voice_sends_the_clip_once_then_its_speaker_vector():
    clip = make_audio(1.0)
    content = [input_audio(clip)]
    with gateway("b") as gw:
        gw.llm.stream = sse(*spoken_stream(UNITS))
        events = gw.stream({"messages": [{"role": "user", "content": content}], **SPEAK, "audio": {"format": "pcm16"},
                            "is_ref_audio": True})  # fmt: skip
        requests = gw.tracks["b"].speech.requests
    assert audio_of(events)[1] == fake_speech(UNITS).tobytes()
    assert len(requests) > 2 and requests[0].reference == clip and requests[0].speaker is None
    assert all(r.reference is None and r.speaker == FAKE_SPEAKER and r.voice is None for r in requests[1:])


def test_a_streamed_file_format_comes_whole_at_the_end():
    with gateway("b") as gw:
        gw.llm.stream = sse(*spoken_stream(UNITS[:3]))
        deltas, data = audio_of(gw.stream(ask(**SPEAK, audio={"format": "mp3"})))
    assert data == b"mp3:None:[0, 7, 14]" and deltas[-1]["transcript"] == "Hello there."


def test_the_first_audio_leaves_before_the_llm_has_finished():
    async def scenario():
        with gateway("b") as gw:
            release = asyncio.Event()
            events = spoken_stream(UNITS, split=1000)

            async def body():
                yield f"data: {json.dumps(events[0])}\n\ndata: {json.dumps(events[1])}\n\n".encode()
                await release.wait()  # the LLM is still writing
                for event in events[2:]:
                    yield f"data: {json.dumps(event)}\n\n".encode()
                yield b"data: [DONE]\n\n"

            gw.llm.stream_body = body
            seen: list[bytes] = []

            async def on_body(data: bytes) -> None:
                seen.append(data)
                if b'"audio"' in data:
                    release.set()

            request = ask(**SPEAK, audio={"format": "pcm16"}, stream=True)
            status = await asyncio.wait_for(gw.asgi_chat(request, on_body), 10)
        return status, b"".join(seen)

    status, body = asyncio.run(scenario())
    assert status == 200 and b"[DONE]" in body and b'"transcript":"Hello there."' in body


def test_a_client_gone_mid_stream_stops_the_decoders_call():
    async def scenario():
        with gateway("b") as gw:
            speech = gw.tracks["b"].speech
            speech.gate = asyncio.Event()  # decoder calls never finish
            gw.llm.stream = sse(*spoken_stream(UNITS))
            gone = asyncio.Event()

            async def leave_once_decoding() -> None:
                while not speech.requests:
                    await asyncio.sleep(0.01)
                gone.set()

            async def on_body(data: bytes) -> None:
                pass

            leaving = asyncio.ensure_future(leave_once_decoding())
            request = ask(**SPEAK, audio={"format": "pcm16"}, stream=True)
            await asyncio.wait_for(gw.asgi_chat(request, on_body, gone), 10)
            await leaving
            return len(speech.requests)

    assert asyncio.run(scenario()) >= 1  # and returned: the call in flight was cancelled, not awaited


# ---------------------------------------------------------------------------------------------- later turns
def test_a_later_turn_refers_to_a_spoken_answer_by_its_id():
    with gateway("b") as gw:
        gw.llm.reply = completion(SPOKEN)
        audio = gw.chat(ask(**SPEAK)).json()["choices"][0]["message"]["audio"]
        gw.llm.reply = completion("Fine.")
        turns = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "audio": {"id": audio["id"]}},
                 {"role": "user", "content": "Again?"}]  # fmt: skip
        assert gw.chat({"messages": turns}).status_code == 200
        assert gw.llm.requests[-1]["messages"][1] == {"role": "assistant", "content": "Hello there."}


@pytest.mark.parametrize(
    "audio_id, message",
    [
        ("audio_abc", "not the id of a spoken answer of this server"),
        ("chatcmpl-1", "not the id of a spoken answer of this server"),
        (audio_id("Hi.", int(time.time()) - 1), "expired; send its transcript as content"),
        # an id that inflates beyond any transcript (a well-formed one: the bound refuses it, not its JSON)
        (audio_id("x" * (2 << 20), int(time.time()) + 3600), "not the id"),
        ("audio_" + base64.urlsafe_b64encode(zlib.compress(b'{"t": 5, "e": 99999999999}')).decode(), "not the id"),
        ("audio_" + base64.urlsafe_b64encode(zlib.compress(b'{"t": "Hi", "e": "soon"}')).decode(), "not the id"),
    ],
    # stable ids: the expired one's text depends on the clock
    ids=["foreign", "another kind", "expired", "inflates too far", "not text", "no expiry"],
)
def test_an_id_that_is_not_ours_or_expired_is_a_400(audio_id, message):
    with gateway("b") as gw:
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "audio": {"id": audio_id}},
                 {"role": "user", "content": "Again?"}]  # fmt: skip
        response = gw.chat({"messages": turns})
        assert gw.llm.requests == []
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages[1].audio.id" and message in error["message"]


def test_only_an_assistant_message_refers_to_audio():
    with gateway("b") as gw:
        response = gw.chat({"messages": [{"role": "user", "content": "Hi", "audio": {"id": "audio_x"}}]})
    assert response.status_code == 400
