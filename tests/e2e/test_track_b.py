"""Track B end to end, beyond what every track does (tests/e2e/test_tracks.py): audio in every form and container,
the Omni LLM's unit tokens, bad media, and the encoders batching concurrent requests."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import data_url, make_audio, make_av_media, make_png, make_video
from tests.e2e.helpers import CONTENT_CHANGE, GREEDY, MODELS, SAME_INPUT, client_for, drawn, logprob_distance

pytestmark = pytest.mark.e2e

MODEL = MODELS["b"]
NO_REASONING = {"chat_template_kwargs": {"skip_reasoning": True}}


@pytest.fixture(scope="module")
def client(server):
    return client_for(f"{server.url}/b/v1")


def ask(client, content, **kwargs):
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, messages=messages, **{"max_tokens": 16, **GREEDY, **kwargs})


def text(value):
    return {"type": "text", "text": value}


def audio(data: bytes, fmt: str | None = "wav"):
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def audio_ref(value: str):
    return {"type": "input_audio", "input_audio": {"data": value, "format": "wav"}}


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def answer(response) -> str:
    message = response.choices[0].message
    return message.content or message.model_extra.get("reasoning_content") or ""


def test_thinking_budget_holds_for_a_prompt_with_embeddings(client):
    """OmniServe's prompt-embeds path could not enforce `thinking_token_budget`; token ids plus embedding slots can."""
    budget = 6
    response = ask(
        client,
        [audio(make_audio(1.0)), text("What is 3 + 4?")],
        max_tokens=40,
        extra_body={"thinking_token_budget": budget, "min_tokens": 32},
    )
    message = response.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content
    assert len(reasoning.split()) <= budget + 1  # the budget is in tokens; words are never more than tokens


def test_wav_audio(client):
    response = ask(client, [audio(make_audio(seconds=2.0, rate=22050)), text("What do you hear?")])
    assert answer(response)
    # 2 s of audio: 50 CosyVoice codes + 50 continuous rows, plus the template's text
    assert response.usage.prompt_tokens > 100


def test_audio_forms_reach_the_model_identically(client, media_server):
    """OpenAI's base64 bytes, a data: URL, a plain URL and base64 of the URL (OmniServe's form) are one clip."""
    base, root = media_server
    wav = (root / "tone.wav").read_bytes()
    url = f"{base}/tone.wav"
    forms = [
        audio(wav),
        audio_ref(data_url(wav, "audio/wav")),
        audio_ref(url),
        audio_ref(base64.b64encode(url.encode()).decode()),
        audio_ref(base64.urlsafe_b64encode(url.encode()).decode()),
        {"type": "audio_url", "audio_url": {"url": url}},
    ]
    results = [ask(client, [form, text("Describe the sound.")], extra_body=NO_REASONING) for form in forms]
    assert len({(r.usage.prompt_tokens, r.choices[0].message.content) for r in results}) == 1


def test_different_sounds_give_different_answers(client, media_server):
    """The audio's content reaches the model: a 660-Hz MP3 is not heard as the 440-Hz WAV, and the same WAV sent
    again is heard the same."""
    base, _ = media_server
    options = {"extra_body": NO_REASONING, "logprobs": True, "top_logprobs": 5, "max_tokens": 4}
    wav = ask(client, [audio_ref(f"{base}/tone.wav"), text("Describe the sound.")], **options)
    wav_again = ask(
        client,
        [{"type": "audio_url", "audio_url": {"url": f"{base}/tone.wav"}}, text("Describe the sound.")],
        **options,
    )
    mp3_part = {"type": "input_audio", "input_audio": {"data": f"{base}/tone.mp3", "format": "mp3"}}
    mp3 = ask(client, [mp3_part, text("Describe the sound.")], **options)
    assert answer(mp3)
    assert logprob_distance(wav, wav_again) <= SAME_INPUT
    assert logprob_distance(wav, mp3) > CONTENT_CHANGE


def test_m4a_audio_and_a_video_files_sound_track(client):
    """An M4A clip and a video with the same sound track: both decode (FFmpeg via PyAV); the video's continuous
    rows go through the MambaMia compressor, 25 rows per second -> 1, while its 50 codes stay."""
    m4a = ask(client, [audio(make_av_media("mp4", "aac", seconds=2.0), "m4a"), text("Hi")], extra_body=NO_REASONING)
    video = make_av_media("mp4", "aac", seconds=2.0, video=True)
    from_video = ask(client, [audio(video, "mp4"), text("Hi")], extra_body=NO_REASONING)
    assert answer(m4a) and answer(from_video)
    rows = m4a.usage.prompt_tokens - from_video.usage.prompt_tokens
    assert 45 <= rows <= 50, (m4a.usage.prompt_tokens, from_video.usage.prompt_tokens)


def test_a_video_is_heard_as_well_as_seen(client):
    """A video_url with a sound track: its sound reaches the LLM too (an audio part after the video's: the compressed
    rows and the codes), unless the part says `sound: false`."""
    video = make_av_media("mp4", "aac", seconds=2.0, video=True)

    def prompt_tokens(*parts) -> int:
        return ask(client, [*parts, text("Hi")], extra_body=NO_REASONING).usage.prompt_tokens

    part = {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}}
    heard, seen = prompt_tokens(part), prompt_tokens({**part, "sound": False})
    # as many tokens as the same file sent as audio brings (its compressed rows, its codes and their markers)
    sound = prompt_tokens(audio(video, "mp4")) - prompt_tokens()
    assert sound > 50 and abs((heard - seen) - sound) <= 2, (heard, seen, sound)


def test_everything_in_one_request_streams_like_it_answers(client, media_server):
    base, root = media_server
    content = [
        image_url(data_url((root / "blue.png").read_bytes(), "image/png")),
        {"type": "video", "video": [f"{base}/red.png", f"{base}/red.png", f"{base}/red.png", f"{base}/red.png"]},
        audio((root / "tone.wav").read_bytes()),
        audio_ref(f"{base}/tone.mp3"),
        text("What is in these?"),
    ]
    whole = ask(client, content, extra_body=NO_REASONING)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_REASONING,
            **GREEDY,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_discrete_codes_enter_the_prompt_as_unit_tokens(server, track_b_model_dir):
    """Straight at the LLM component's vLLM: codes become `unit_0 + code` token ids (not raw ids, OmniServe's
    bug) between their block markers, and every continuous row gets one slot."""
    import torch

    tokenizer = AutoTokenizer.from_pretrained(track_b_model_dir / "llm")
    config = json.loads((track_b_model_dir / "llm" / "config.json").read_text())

    def b64(tensor):
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return base64.b64encode(buffer.getvalue()).decode()

    hidden = config["hidden_size"]
    content = [
        {
            "type": "image_embeds",
            "image_embeds": {
                "image_embeds": b64(torch.zeros(4, hidden)),
                "image_grid_thw": [1, 4, 4],
                "discrete_image_codes": [0, 7, 1023],
            },
        },
        {
            "type": "audio_embeds",
            "audio_embeds": {"audio_embeds": b64(torch.zeros(5, hidden)), "discrete_audio_codes": [6560, 3]},
        },
        {"type": "text", "text": "Hi"},
    ]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    url = f"{server.llm_urls['b']}/v1/chat/completions"
    response = httpx.post(url, json={**body, "return_token_ids": True}, timeout=120)
    assert response.status_code == 200, response.text
    ids = response.json()["prompt_token_ids"]
    vision_0 = tokenizer.convert_tokens_to_ids("<|vision00000|>")
    audio_0 = tokenizer.convert_tokens_to_ids("<|audio0000|>")
    start = tokenizer.convert_tokens_to_ids("<|discrete_image_start|>")
    assert ids[ids.index(start) + 1 : ids.index(start) + 5] == [
        vision_0,
        vision_0 + 7,
        vision_0 + 1023,
        tokenizer.convert_tokens_to_ids("<|discrete_image_end|>"),
    ]
    start = tokenizer.convert_tokens_to_ids("<|discrete_audio_start|>")
    assert ids[ids.index(start) + 1 : ids.index(start) + 3] == [audio_0 + 6560, audio_0 + 3]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|IMAGE_PAD|>")) == 4
    assert ids.count(tokenizer.convert_tokens_to_ids("<|AUDIO_PAD|>")) == 5

    # and the engine refuses, with a 400, codes outside the codebook and embeddings of the wrong width
    content[0]["image_embeds"]["discrete_image_codes"] = [1024]
    assert httpx.post(url, json=body, timeout=60).status_code == 400
    content[0]["image_embeds"]["discrete_image_codes"] = [1]
    content[1]["audio_embeds"]["audio_embeds"] = b64(torch.zeros(5, hidden + 1))
    assert httpx.post(url, json=body, timeout=60).status_code == 400
    assert httpx.get(f"{server.llm_urls['b']}/health", timeout=10).status_code == 200


def wav_header_only() -> bytes:
    return make_audio(1.0)[:44]


BAD_REQUESTS = [
    # corrupt, empty, unsupported and over-long audio
    ([audio(b"RIFF\x00\x00\x00\x00WAVEfmt garbage that is not audio")], 400, "messages[0].content[0]"),
    ([audio(wav_header_only())], 400, "messages[0].content[0]"),
    ([audio_ref("")], 400, "messages[0].content[0].input_audio.data"),
    ([audio(b"\x00\x00\x00\x18ftypM4A \x00\x00\x00\x00", fmt=None)], 400, "messages[0].content[0]"),
    ([audio(make_audio(1.0), fmt="midi")], 400, "messages[0].content[0].input_audio.format"),
    ([audio(make_audio(seconds=25.0, rate=8000))], 413, "messages[0].content[0]"),
    ([audio_ref(base64.b64encode(b"s3://bucket/key.pt").decode())], 400, "messages[0].content[0]"),
    ([audio_ref("file:///etc/passwd")], 400, "messages[0].content[0]"),
    ([audio(make_audio(0.5))] * 5, 400, "messages"),
    # bad video: corrupt, too long, too many frames
    (
        [{"type": "video_url", "video_url": {"url": data_url(make_video(seconds=25, fps=2), "video/mp4")}}],
        413,
        "messages[0].content[0]",
    ),
    ([{"type": "video", "video": [data_url(make_png(), "image/png")] * 300}], 400, "messages[0].content[0]"),
]


@pytest.mark.parametrize(("content", "status", "param"), BAD_REQUESTS)
def test_bad_media_gets_an_openai_error(server, content, status, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    response = httpx.post(f"{server.url}/b/v1/chat/completions", json=body, headers=server.headers, timeout=120)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert "Traceback" not in response.text


def test_still_healthy_after_bad_media(server, client):
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert ask(client, [audio(make_audio(1.0)), text("Hi")], max_tokens=4).choices[0].finish_reason


def test_concurrent_requests_are_batched_without_mixing_them_up(client):
    """Eight clients at once (the encoders batch them): each gets the answer it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    contents = [
        [
            audio(make_audio(seconds=1.0 + k / 4, freq=220.0 * (k + 1))),
            image_url(data_url(make_png(color=(30 * k, 0, 0)))),
        ]
        + [text("Describe.")]
        for k in range(8)
    ]

    def one(content):
        response = ask(client, content, max_tokens=6, extra_body=NO_REASONING)
        return response.usage.prompt_tokens, response.choices[0].message.content

    alone = [one(content) for content in contents]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, contents))
    # every clip has its own length, so a request given another's embeddings would show in its prompt length
    assert len({tokens for tokens, _ in alone}) == 8
    assert [tokens for tokens, _ in together] == [tokens for tokens, _ in alone]
    # greedy answers match; batched float sums may differ in the last bits, so one flipped token is tolerated
    assert sum(a == b for (_, a), (_, b) in zip(together, alone)) >= 7


def test_the_llm_is_held_to_the_speech_and_image_formats_when_asked(server):
    """The output-format logits processor (hcxserve.llm.media_format) loaded by the bento's track B engine: the
    embedded LLM never learned either format, yet what it writes parses as a speech block within the asked bounds,
    and as an image block with a known ratio and exactly 729 codes; bad bounds are a 400 from the API server."""
    from hcxserve.gateway.output_parser import ImageTokens, OmniOutputParser, SpeechEnd, SpeechStart, SpeechUnits
    from hcxserve.llm.media_format import IMAGE_RATIOS

    llm = f"{server.llm_urls['b']}/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0,
            "skip_special_tokens": False, **NO_REASONING}  # fmt: skip

    def events(xargs: dict, max_tokens: int) -> list:
        response = httpx.post(llm, json={**base, "max_tokens": max_tokens, "vllm_xargs": xargs}, timeout=300)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop"  # the format ended the turn, not max_tokens
        parser = OmniOutputParser()
        return parser.feed(choice["message"]["content"]) + parser.finish()

    speech = events({"hcx_output": "speech", "hcx_min_units": 6, "hcx_max_units": 12, "hcx_max_text_tokens": 5}, 64)
    assert [type(e) for e in speech if not isinstance(e, SpeechUnits)][-2:] == [SpeechStart, SpeechEnd]
    units = [code for e in speech if isinstance(e, SpeechUnits) for code in e.codes]
    assert 6 <= len(units) <= 12 and all(0 <= u < 6561 for u in units)
    (image,) = events({"hcx_output": "image"}, 800)
    assert isinstance(image, ImageTokens) and image.complete
    assert image.ratio in IMAGE_RATIOS and len(image.codes) == 729
    refused = httpx.post(llm, json={**base, "vllm_xargs": {"hcx_output": "speech", "hcx_max_units": 0}}, timeout=60)
    assert refused.status_code == 400 and "hcx_max_units" in refused.json()["error"]["message"]


def test_a_spoken_answer_through_the_openai_sdk(client):
    """modalities + audio, as OpenAI's SDK sends them: the embedded LLM is held to the speech format, the gateway
    parses its output and the AudioDecoder speaks it: a 24 kHz file of 960 samples per unit, in the voice asked."""
    import soundfile

    question = [{"role": "user", "content": "Say hello."}]

    def spoken(voice: str, fmt: str):
        response = client.chat.completions.create(
            model=MODEL, messages=question, modalities=["text", "audio"], audio={"voice": voice, "format": fmt},
            max_tokens=48, temperature=0,
        )  # fmt: skip
        message = response.choices[0].message
        assert message.audio.transcript == message.content and message.content
        return base64.b64decode(message.audio.data)

    samples, rate = soundfile.read(io.BytesIO(spoken("fkms", "wav")), dtype="int16")
    assert rate == 24000 and len(samples) > 0 and len(samples) % 960 == 0
    mp3, mp3_rate = soundfile.read(io.BytesIO(spoken("fkms", "mp3")), dtype="int16")
    assert mp3_rate == 24000 and abs(len(mp3) - len(samples)) < 2400
    pcm = spoken("fkms", "pcm16")
    assert pcm == samples.astype("<i2").tobytes()  # the same samples, raw
    other = soundfile.read(io.BytesIO(spoken("mhwj", "wav")), dtype="int16")[0]
    assert other.shape == samples.shape and (other != samples).any()  # same units, another voice
    with pytest.raises(openai.BadRequestError) as refused:
        spoken("nobody", "wav")
    assert refused.value.body["param"] == "audio.voice"


def test_speech_streams_through_the_openai_sdk_as_it_is_generated(client):
    """A streamed spoken answer, as OpenAI streams one: `delta.audio` with the id once, pcm16 parts (each a whole
    number of samples and of base64 quanta) leaving while the LLM still writes units, then the transcript; the
    parts concatenate to the samples of the same answer not streamed. (`min_tokens`: at least 40 units, 1.6 s.)"""
    question = [{"role": "user", "content": "Say hello."}]
    options = {"model": MODEL, "messages": question, "modalities": ["text", "audio"],
               "audio": {"voice": "fkms", "format": "pcm16"}, "max_tokens": 64, "extra_body": {"min_tokens": 40},
               **GREEDY}  # fmt: skip
    whole = base64.b64decode(client.chat.completions.create(**options).choices[0].message.audio.data)
    audio, text, finishes = [], [], []
    for chunk in client.chat.completions.create(**options, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                text.append(delta.content)
            if delta.audio is not None:  # the SDK's own type for streamed audio
                audio.append(delta.audio.model_dump(exclude_none=True))
            if choice.finish_reason:
                finishes.append((len(audio), choice.finish_reason))
    parts = [base64.b64decode(a["data"]) for a in audio if "data" in a]
    assert audio[0]["id"].startswith("audio_") and all("id" not in a for a in audio[1:])
    assert len(parts) >= 2 and all(len(p) % 6 == 0 for p in parts[:-1])  # in parts, each whole
    streamed = np.frombuffer(b"".join(parts), dtype="<i2").astype(int)
    reference = np.frombuffer(whole, dtype="<i2").astype(int)
    assert streamed.shape == reference.shape and np.abs(streamed - reference).max() <= 1  # a rounding step at most
    assert audio[-1]["transcript"] == "".join(text).strip() and audio[-1]["expires_at"] > 0
    assert finishes == [(len(audio), "stop")]


def test_speech_to_speech_in_the_callers_voice(client):
    """`is_ref_audio` (OmniServe's switch, in `extra_body`) speaks the answer in the voice of the last input audio,
    through the zero-shot vocoder: the same words as in the default voice, but another voice."""
    clip = make_audio(2.0, freq=180.0)
    options = {"modalities": ["text", "audio"], "audio": {"format": "pcm16"}, "max_tokens": 48}

    def spoken(**extra):
        response = ask(client, [audio(clip), text("Answer me.")], **options, **extra)
        return np.frombuffer(base64.b64decode(response.choices[0].message.audio.data), dtype="<i2")

    default, cloned = spoken(), spoken(extra_body={"is_ref_audio": True})
    assert default.shape == cloned.shape and np.abs(default.astype(int) - cloned).mean() > 10


IMAGE_TOOL = {"type": "function", "function": {
    "name": "t2i_model_generation", "description": "Generates an RGB image from discrete image tokens.",
    "parameters": {"type": "object", "required": ["discrete_image_token"],
                   "properties": {"discrete_image_token": {"type": "string", "minLength": 1}}}}}  # fmt: skip
DRAW = {"tools": [IMAGE_TOOL], "tool_choice": {"type": "function", "function": {"name": "t2i_model_generation"}},
        "max_tokens": 800, "extra_body": {"image": {"steps": 2, "seed": 1}}}  # fmt: skip


def test_image_to_image_streams_through_the_openai_sdk(client):
    """A `tool_choice` naming t2i_model_generation: the LLM is held to its image format, the VisionDecoder draws it,
    and the picture, stored in S3 behind a presigned URL, arrives as one `delta.images` chunk (OpenRouter's form)
    with OmniServe's tool call, before the finish. (OmniServe's checks 6 and 7 send both, not streamed, over raw
    HTTP: tests/e2e/test_omniserve_checks.py.)"""
    picture = data_url(make_png(64, 48, (200, 30, 30)), "image/png")
    chunks = list(ask(client, [image_url(picture), text("Make it a cartoon.")], **DRAW, stream=True))
    with_image = [c for c in chunks if c.choices and (c.choices[0].delta.model_extra or {}).get("images")]
    assert len(with_image) == 1
    delta = with_image[0].choices[0].delta
    (image,) = delta.model_extra["images"]
    (call,) = delta.tool_calls
    assert call.function.name == "t2i_model_generation"
    assert json.loads(call.function.arguments) == {"discrete_image_token": image["image_url"]["url"]}
    drawn(image["image_url"]["url"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices and "vision" in (c.choices[0].delta.content or "") for c in chunks)  # no tokens as text


def test_text_to_image_through_the_openai_sdk(client):
    """Not streamed: `message.images` (OpenRouter's form, which the SDK keeps as an extra field) and OmniServe's
    tool call, whose `discrete_image_token` argument is the same presigned URL; the finish is the tool call's."""
    response = ask(client, [text("Draw a red apple.")], **DRAW)
    (choice,) = response.choices
    (call,) = choice.message.tool_calls
    (image,) = choice.message.model_extra["images"]
    assert call.function.name == "t2i_model_generation" and choice.finish_reason == "tool_calls"
    assert json.loads(call.function.arguments) == {"discrete_image_token": image["image_url"]["url"]}
    assert image["index"] == 0 and image["type"] == "image_url"
    drawn(image["image_url"]["url"])
    assert "vision" not in (choice.message.content or "")  # the image's tokens are not text
