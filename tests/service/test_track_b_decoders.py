"""Track B's decoder services in-process, on the embedded default decoders: speech and images as clients get them."""

import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from bentos.track_b import DEPLOYMENT, Gateway
from hcxserve.protocol.payloads import UNKNOWN_VOICE, ImageRequest, SpeechRequest
from tests.conftest import make_audio

AudioDecoder = Gateway.dependencies["b_audio_decoder"].on
VisionDecoder = Gateway.dependencies["b_vision_decoder"].on
CONFIG = DEPLOYMENT.tracks["b"].components
UNITS = [int(u) for u in np.random.default_rng(0).integers(0, 6561, 50)]


@pytest.fixture(scope="module")
def speech(track_b_model_dir):
    return AudioDecoder()


@pytest.fixture(scope="module")
def images(track_b_model_dir):
    return VisionDecoder()


def wav(data: bytes, dtype: str = "float32") -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(io.BytesIO(data), dtype=dtype)
    return samples, rate


def test_units_become_24_khz_speech_of_960_samples_each_in_every_format(speech):
    results = speech.decode([SpeechRequest(units=UNITS, format=fmt) for fmt in ("wav", "flac", "mp3", "pcm16")])
    assert all(r.error is None and r.sample_rate == 24000 and r.samples == len(UNITS) * 960 for r in results)
    samples, rate = wav(results[0].data)
    assert rate == 24000 and len(samples) == len(UNITS) * 960 and np.abs(samples).max() > 0
    np.testing.assert_array_equal(wav(results[1].data, "int16")[0], wav(results[0].data, "int16")[0])  # lossless
    mp3, mp3_rate = wav(results[2].data)
    assert mp3_rate == 24000 and abs(len(mp3) - len(samples)) < 2400  # lossy, framed
    np.testing.assert_array_equal(np.frombuffer(results[3].data, dtype="<i2"), wav(results[0].data, "int16")[0])


def test_a_batch_equals_one_request_at_a_time_and_voices_differ(speech):
    requests = [SpeechRequest(units=UNITS, voice="fkms"), SpeechRequest(units=UNITS[:20], voice="mhwj"),
                SpeechRequest(units=UNITS[20:40], voice="fkms")]  # fmt: skip
    batch = speech.decode(requests)
    alone = [speech.decode([request])[0] for request in requests]
    for got, single in zip(batch, alone):  # at most a rounding step apart (another batch, another kernel path)
        assert np.abs(wav(got.data, "int16")[0].astype(int) - wav(single.data, "int16")[0]).max() <= 1
    assert wav(batch[1].data)[0].shape == (20 * 960,)
    other = wav(speech.decode([SpeechRequest(units=UNITS[:20], voice="fkms")])[0].data)[0]
    assert np.abs(other - wav(batch[1].data)[0]).max() > 1e-3
    assert speech.voices() == ["fkms", "mhwj", "fphj", "mphw"]


def test_a_reference_clip_gives_its_own_voice_and_its_speaker_vector_stands_for_it(speech):
    clips = [make_audio(2.0, freq=220.0), make_audio(2.0, freq=880.0)]
    cloned = speech.decode([SpeechRequest(units=UNITS, reference=c) for c in clips])
    first, second = (wav(r.data)[0] for r in cloned)
    default = speech.decode([SpeechRequest(units=UNITS)])[0]
    assert np.abs(first - second).max() > 1e-3 and np.abs(first - wav(default.data)[0]).max() > 1e-3
    # the vector the clip gave speaks as the clip does (a stream's later parts send it instead of the clip)
    assert len(cloned[0].speaker) == speech.pipeline.zeroshot.config.spk_emb_dim and default.speaker is None
    (again,) = speech.decode([SpeechRequest(units=UNITS, speaker=cloned[0].speaker)])
    assert again.speaker is None  # at most a rounding step apart (the clips were decoded as a batch)
    assert np.abs(wav(again.data, "int16")[0].astype(int) - wav(cloned[0].data, "int16")[0]).max() <= 1
    (bad,) = speech.decode([SpeechRequest(units=UNITS, speaker=[float("nan")] * len(cloned[0].speaker))])
    assert bad.status == 400 and "finite values" in bad.error


def test_a_stream_of_parts_concatenates_to_the_whole_decode(speech):
    # each call carries all units so far and where the last answer stopped: no state on the decoder
    whole = np.frombuffer(speech.decode([SpeechRequest(units=UNITS, format="pcm16")])[0].data, dtype="<i2")
    pieces, start = [], 0
    for arrived, final in ((7, False), (8, False), (30, False), (50, True)):
        part = speech.decode([SpeechRequest(units=UNITS[:arrived], format="pcm16", start_sample=start, final=final)])
        assert part[0].error is None
        pieces.append(np.frombuffer(part[0].data, dtype="<i2"))
        start += part[0].samples
    assert 0 < len(pieces[0]) < 7 * 960  # the lookahead is held back until later units come
    assert np.abs(np.concatenate(pieces).astype(int) - whole).max() <= 1  # a rounding step at most
    assert start == len(whole) == 50 * 960


@pytest.mark.parametrize(
    "request_, status, message",
    [
        (SpeechRequest(units=[1, 6561]), 400, "unit 6561 at position 1 is outside [0, 6561)"),
        (SpeechRequest(units=[]), 400, "0 units to speak"),
        (SpeechRequest(units=[1], voice="nobody"), UNKNOWN_VOICE, "nobody"),
        (SpeechRequest(units=[1], format="wma"), 400, "audio format 'wma' is not supported"),
        (SpeechRequest(units=[1], reference=b"not audio"), 400, ""),
        (SpeechRequest(units=[1], speaker=[0.5] * 3), 400, "finite values"),
        (SpeechRequest(units=[1, 2], start_sample=960, final=False), 400, "raw pcm16"),
        (SpeechRequest(units=[1], format="pcm16", start_sample=961), 400, "outside the 960 samples"),
    ],
)
def test_a_bad_request_is_refused_alone(speech, request_, status, message):
    bad, good = speech.decode([request_, SpeechRequest(units=UNITS[:5])])
    assert bad.data is None and bad.status == status and message in bad.error
    assert good.error is None and good.samples == 5 * 960


def codes(seed: int) -> list[int]:
    return [int(c) for c in np.random.default_rng(seed).integers(0, 1024, 729)]


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)), dtype=np.int16)


def test_an_image_comes_at_its_ratio_size_and_a_seed_repeats_it(images):
    request = ImageRequest(ratio="4:3", codes=codes(0), seed=7, steps=2)
    (first,), (again,) = images.generate([request]), images.generate([request])
    picture = Image.open(io.BytesIO(first.png))
    assert picture.format == "PNG" and picture.size == (880, 656) == (first.width, first.height)
    assert first.png == again.png and first.seed == 7
    in_batch, other = images.generate([request, request.model_copy(update={"codes": codes(1)})])
    assert np.abs(pixels(in_batch) - pixels(first)).max() <= 1  # a batch rounds its matmuls its own way
    assert np.abs(pixels(other) - pixels(first)).mean() > 1


@pytest.mark.parametrize(
    "request_, message",
    [
        (ImageRequest(ratio="7:5", codes=codes(0)), "7:5"),
        (ImageRequest(ratio="1:1", codes=codes(0)[:100]), "needs 729 image tokens, got 100"),
        (ImageRequest(ratio="1:1", codes=[5000] * 729), "outside the codebook"),
        (ImageRequest(ratio="1:1", codes=codes(0), steps=10_000), "steps must be between 1 and"),
    ],
)
def test_a_bad_image_request_is_refused_alone(images, request_, message):
    bad, good = images.generate([request_, ImageRequest(ratio="1:2", codes=codes(2), steps=1)])
    assert bad.png is None and bad.status == 400 and message in bad.error
    assert good.error is None and (good.width, good.height) == (528, 1072)


def test_config_drives_the_services():
    assert (AudioDecoder.name, VisionDecoder.name) == ("TrackB-AudioDecoder", "TrackB-VisionDecoder")
    assert AudioDecoder.apis["decode"].max_batch_size == CONFIG.audio_decoder.max_batch_size
    assert VisionDecoder.apis["generate"].max_batch_size == CONFIG.vision_decoder.max_batch_size
