"""Track B's chat pipeline with a recorded LLM and fake encoders: how every accepted form of audio is resolved,
what reaches vLLM (audio_embeds parts, images with TA-Tok codes, reasoning on by default), and the errors.
The real encoders and vLLM are exercised in tests/e2e/test_track_b.py."""

import asyncio
import base64

import pytest

from hcxserve.audio_inputs import AudioInputs, url_inside_base64
from hcxserve.config import load_track_config
from hcxserve.llm_client import LLMClient
from hcxserve.media import MediaFetcher
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.errors import InvalidRequestError, MediaError, PayloadTooLargeError, UpstreamError
from hcxserve.protocol.openai import ChatCompletionRequest
from hcxserve.protocol.payloads import AudioEmbedding, AudioEncoding, VisionEmbedding, VisionEncoding
from hcxserve.serving import ChatCompletionServing
from hcxserve.visual_inputs import VisualInputs
from tests.conftest import data_url, make_audio, make_png
from tests.unit.test_serving import Recorder

SPEC = VisionTowerSpec(out_hidden_size=8, spatial_merge_size=2, discrete=True)


class FakeAudioEncoder:
    def __init__(self):
        self.calls = []

    async def __call__(self, clips):
        self.calls.append(clips)
        return [
            AudioEncoding(
                embedding=AudioEmbedding(
                    embeds_b64=f"AUD{i}", rows=3, dim=8, dtype="torch.float32", discrete_codes=[4, 5, 6], duration_s=1
                )
            )
            for i in range(len(clips))
        ]


async def fake_vision(items, grid=(1, 4, 4), codes=(1, 2)):
    return [
        VisionEncoding(
            embedding=VisionEmbedding(
                embeds_b64=f"IMG{i}",
                rows=SPEC.rows_for_grid(grid),
                dim=8,
                dtype="torch.float32",
                grid_thw=grid,
                discrete_codes=list(codes) if codes else None,
            )
        )
        for i in range(len(items))
    ]


async def fake_video(items):
    return await fake_vision(items, grid=(2, 4, 4), codes=None)


def serving(recorder, audio_encoder=None, vision=fake_vision, **overrides):
    overrides = {"media.allow_private_networks": "true", **overrides}
    config = load_track_config("b", env={"HCX_OVERRIDES": " ".join(f"{k}={v}" for k, v in overrides.items())})
    import httpx

    client = httpx.AsyncClient(base_url="http://llm", transport=httpx.MockTransport(recorder))
    fetcher = MediaFetcher(config.media)
    visual = VisualInputs(config.media, fetcher=fetcher, spec=SPEC, encode_images=vision, encode_videos=fake_video)
    audio = AudioInputs(config.media, fetcher=fetcher, embed_dim=8, encode_audio=audio_encoder or FakeAudioEncoder())
    return ChatCompletionServing(config, llm=LLMClient(client), visual_inputs=visual, audio_inputs=audio)


def run(svc, body):
    return asyncio.run(svc.create(ChatCompletionRequest.model_validate(body)))


def user(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}]}


def input_audio(data, fmt="wav"):
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


WAV = make_audio(1.0)


def test_audio_and_images_reach_vllm_as_embedding_parts_with_codes():
    recorder, encoder = Recorder(), FakeAudioEncoder()
    image = {"type": "image_url", "image_url": {"url": data_url(make_png())}}
    run(
        serving(recorder, encoder),
        user(image, input_audio(base64.b64encode(WAV).decode()), {"type": "text", "text": "?"}),
    )
    parts = recorder.requests[0]["messages"][0]["content"]
    assert parts[0] == {
        "type": "image_embeds",
        "image_embeds": {"image_embeds": "IMG0", "image_grid_thw": [1, 4, 4], "discrete_image_codes": [1, 2]},
    }
    assert parts[1] == {
        "type": "audio_embeds",
        "audio_embeds": {"audio_embeds": "AUD0", "discrete_audio_codes": [4, 5, 6]},
    }
    assert encoder.calls[0][0].data == WAV and encoder.calls[0][0].max_seconds == 120
    # track B reasons unless asked not to
    assert recorder.requests[0]["chat_template_kwargs"] == {"thinking": True}


def test_skip_reasoning_turns_thinking_off():
    recorder = Recorder()
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"skip_reasoning": True}}
    run(serving(recorder), body)
    assert recorder.requests[0]["chat_template_kwargs"] == {"skip_reasoning": True, "thinking": False}


def test_every_audio_form_resolves_to_the_same_bytes(media_server):
    base, root = media_server
    url = f"{base}/tone.wav"
    wav = (root / "tone.wav").read_bytes()
    forms = [
        input_audio(base64.b64encode(wav).decode()),
        input_audio(data_url(wav, "audio/wav")),
        input_audio(url),
        input_audio(base64.b64encode(url.encode()).decode()),
        input_audio(base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")),
        {"type": "audio_url", "audio_url": {"url": url}},
        {"type": "audio_url", "audio_url": url},
    ]
    encoder = FakeAudioEncoder()
    run(serving(Recorder(), encoder, **{"media.max_audios_per_request": "8"}), user(*forms))
    assert [clip.data for clip in encoder.calls[0]] == [wav] * len(forms)  # one batched call


def test_url_inside_base64():
    assert url_inside_base64(base64.b64encode(b"https://x.test/a.wav").decode()) == "https://x.test/a.wav"
    assert url_inside_base64(base64.b64encode(WAV).decode()) is None
    assert url_inside_base64(base64.b64encode(b"s3://bucket/key.pt").decode()) == "s3://bucket/key.pt"
    assert url_inside_base64("not base64 at all!") is None


@pytest.mark.parametrize(
    ("part", "error", "param"),
    [
        (input_audio(base64.b64encode(b"s3://bucket/embedding.pt").decode()), MediaError, "messages[0].content[0]"),
        (input_audio("s3://bucket/embedding.pt"), MediaError, "messages[0].content[0]"),
        (input_audio("file:///etc/passwd"), MediaError, "messages[0].content[0]"),
        (input_audio("%%% not audio %%%"), MediaError, "messages[0].content[0]"),
        (input_audio("AAAA", fmt="midi"), InvalidRequestError, "messages[0].content[0].input_audio.format"),
    ],
)
def test_refused_audio_references(part, error, param):
    encoder = FakeAudioEncoder()
    with pytest.raises(error) as info:
        run(serving(Recorder(), encoder), user(part))
    assert info.value.param == param
    assert encoder.calls == []  # nothing reached the encoder


def test_limits_on_audio():
    clip = input_audio(base64.b64encode(WAV).decode())
    with pytest.raises(InvalidRequestError) as info:
        run(serving(Recorder()), user(*[clip] * 5))
    assert info.value.code == "too_many_audios"
    with pytest.raises(PayloadTooLargeError):
        run(serving(Recorder(), **{"media.max_audio_bytes": "1000"}), user(clip))


def test_encoder_refusals_keep_their_status_and_name_the_part():
    async def refuse(clips):
        return [
            AudioEncoding(error="cannot decode the audio", status=400),
            AudioEncoding(error="audio is 700.0 s long, over the limit of 120 s", status=413),
        ]

    clip = input_audio(base64.b64encode(WAV).decode())
    with pytest.raises(MediaError) as info:
        run(serving(Recorder(), refuse), user(clip, clip))
    assert info.value.param == "messages[0].content[0]"

    async def too_long(clips):
        return [AudioEncoding(error="audio is 700.0 s long, over the limit of 120 s", status=413)]

    with pytest.raises(PayloadTooLargeError) as info:
        run(serving(Recorder(), too_long), user(clip))
    assert "700.0 s" in info.value.message


def test_malformed_encoder_output_never_reaches_the_llm():
    async def wrong_width(clips):
        results = await FakeAudioEncoder()(clips)
        results[0].embedding.dim = 9
        return results

    async def codes_missing(items):
        return await fake_vision(items, codes=None)

    recorder = Recorder()
    with pytest.raises(UpstreamError):
        run(serving(recorder, wrong_width), user(input_audio(base64.b64encode(WAV).decode())))
    with pytest.raises(UpstreamError):
        run(serving(recorder, vision=codes_missing), user({"type": "image", "image": data_url(make_png())}))
    assert recorder.requests == []


def test_track_a_still_refuses_audio():
    from tests.unit.test_serving import serving as track_a_serving

    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(
            track_a_serving(Recorder()).create(
                ChatCompletionRequest.model_validate(user(input_audio(base64.b64encode(WAV).decode())))
            )
        )
    assert info.value.code == "unsupported_content_type"
    assert "input_audio" not in info.value.message.split("supported:")[1]
