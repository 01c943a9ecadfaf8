"""Track B's encoder services in-process, on the embedded default: what the gateway gets back."""

import base64
import io
import json

import pytest
import torch

from bentos.track_b import DEPLOYMENT, Gateway
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.payloads import AudioInput, ImageInput, VideoInput
from tests.conftest import make_audio, make_av_media, make_png, make_video

VisionEncoder = Gateway.dependencies["b_vision_encoder"].on
AudioEncoder = Gateway.dependencies["b_audio_encoder"].on
CONFIG = DEPLOYMENT.tracks["b"]


@pytest.fixture(scope="module")
def vision(track_b_model_dir):
    return VisionEncoder()


@pytest.fixture(scope="module")
def audio(track_b_model_dir):
    return AudioEncoder()


def rows(embedding) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(embedding.embeds_b64)), weights_only=True)


def test_images_get_llm_width_rows_and_codes_videos_only_rows(vision, track_b_model_dir):
    spec = VisionTowerSpec.from_dir(track_b_model_dir / "ve")
    text_hidden = json.loads((track_b_model_dir / "llm" / "config.json").read_text())["hidden_size"]
    assert spec.discrete and spec.out_hidden_size == text_hidden  # the projector sits in ve/ on track B
    red, green = vision.encode([ImageInput(data=make_png()), ImageInput(data=make_png(color=(10, 200, 10)))])
    codebook = json.loads((track_b_model_dir / "ve" / "config.json").read_text())["discrete_vision_config"]
    for result in (red, green):
        embedding = result.embedding
        assert rows(embedding).shape == (embedding.rows, text_hidden)
        assert len(embedding.discrete_codes) == codebook["bottleneck_token_num"]
        assert all(0 <= c < codebook["codebook_size"] for c in embedding.discrete_codes)
    assert red.embedding.discrete_codes != green.embedding.discrete_codes
    # deterministic (argmax) codes: the same image always gives the same codes
    assert vision.encode([ImageInput(data=make_png())])[0].embedding.discrete_codes == red.embedding.discrete_codes
    (video,) = vision.encode_videos([VideoInput(data=make_video(seconds=2), fps=2, max_pixels=12544)])
    assert video.embedding.discrete_codes is None and rows(video.embedding).shape[1] == text_hidden


def test_audio_rows_and_codes_at_25_per_second(audio):
    (result,) = audio.encode([AudioInput(data=make_audio(seconds=2.0, rate=44100), max_seconds=10)])
    embedding = result.embedding
    assert rows(embedding).shape == (50, embedding.dim) and embedding.rows == 50
    assert len(embedding.discrete_codes) == 50 and all(0 <= c < 6561 for c in embedding.discrete_codes)
    assert embedding.duration_s == pytest.approx(2.0)


def test_bad_and_long_clips_fail_alone_with_their_status(audio):
    good, corrupt, long, short = audio.encode(
        [
            AudioInput(data=make_audio(1.0), max_seconds=5, min_seconds=0.1),
            AudioInput(data=b"RIFF\x00\x00\x00\x00WAVEnot really", max_seconds=5),
            AudioInput(data=make_audio(seconds=8.0, rate=8000), max_seconds=5),
            AudioInput(data=make_audio(seconds=0.03), max_seconds=5, min_seconds=0.1),  # under one encoder row
        ]
    )
    assert good.embedding is not None
    assert short.embedding is None and short.status == 400 and "shorter than 0.1 s" in short.error
    assert corrupt.embedding is None and corrupt.status == 400 and "WAV" in corrupt.error
    assert long.embedding is None and long.status == 413 and "over the limit of 5 s" in long.error


def test_a_video_files_sound_track_is_compressed(audio):
    plain, video = audio.encode(
        [
            AudioInput(data=make_av_media("mp4", "aac", seconds=2.0), max_seconds=10),
            AudioInput(data=make_av_media("mp4", "aac", seconds=2.0, video=True), max_seconds=10),
        ]
    )
    assert plain.embedding.rows >= 50 and video.embedding.rows == 3  # ceil(~2.02 s * 25 / 25)
    assert len(video.embedding.discrete_codes) == len(plain.embedding.discrete_codes)


def test_config_drives_the_services():
    assert AudioEncoder.apis["encode"].batchable
    assert AudioEncoder.apis["encode"].max_batch_size == CONFIG.components.audio_encoder.max_batch_size
    assert VisionEncoder.apis["encode"].max_batch_size == CONFIG.components.vision_encoder.max_batch_size
