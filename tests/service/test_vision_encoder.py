"""The VisionEncoder service in-process, on the embedded default tower: what the gateway gets back."""

import base64
import io

import pytest
import torch

from bentos.track_a import DEPLOYMENT, Gateway
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.payloads import ImageInput, VideoInput
from tests.conftest import make_png, make_video

VisionEncoder = Gateway.dependencies["a_vision_encoder"].on
CONFIG = DEPLOYMENT.tracks["a"].components.vision_encoder


@pytest.fixture(scope="module")
def encoder(track_a_model_dir):
    return VisionEncoder()


def features(encoding) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(encoding.embedding.embeds_b64)), weights_only=True)


def test_batch_of_images_matches_one_by_one(encoder, track_a_model_dir):
    spec = VisionTowerSpec.from_dir(track_a_model_dir / "ve")
    images = [ImageInput(data=make_png(64, 48)), ImageInput(data=make_png(200, 120, (10, 200, 10)))]
    batch = encoder.encode(images)
    single = [encoder.encode([image])[0] for image in images]
    for got, alone in zip(batch, single):
        embedding = got.embedding
        assert embedding.rows == spec.rows_for_grid(embedding.grid_thw)
        assert embedding.dim == spec.out_hidden_size == features(got).shape[1]
        assert features(got).shape[0] == embedding.rows
        torch.testing.assert_close(features(got), features(alone), rtol=1e-4, atol=1e-5)
    assert batch[0].embedding.grid_thw == (1, 4, 4)  # 64x48 -> resized to 56x56 -> 4x4 patches
    assert not torch.equal(features(batch[0])[:1], features(batch[1])[:1])


def test_a_bad_image_does_not_fail_the_batch(encoder):
    results = encoder.encode([ImageInput(data=b"garbage"), ImageInput(data=make_png())])
    assert results[0].embedding is None and "not a decodable image" in results[0].error
    assert results[1].embedding is not None and results[1].error is None


def test_config_drives_the_service():
    assert VisionEncoder.name == "TrackA-VisionEncoder"
    assert VisionEncoder.config["resources"]["gpu"] == CONFIG.gpus
    api = VisionEncoder.apis["encode"]
    assert api.batchable and api.max_batch_size == CONFIG.max_batch_size


def test_each_embedding_carries_only_its_own_rows(encoder):
    # a batch's features are views into one tensor; serialising a view must not ship the whole batch
    results = encoder.encode([ImageInput(data=make_png(448, 336)) for _ in range(4)])
    single_size = len(encoder.encode([ImageInput(data=make_png(448, 336))])[0].embedding.embeds_b64)
    assert all(len(r.embedding.embeds_b64) == single_size for r in results)


def test_video_file_and_frame_list(encoder, track_a_model_dir):
    spec = VisionTowerSpec.from_dir(track_a_model_dir / "ve")
    clip, frames = encoder.encode_videos(
        [
            VideoInput(data=make_video(seconds=3, fps=10), fps=2.0, max_pixels=112 * 112),
            VideoInput(frames=[make_png(64, 48, (i * 40, 0, 0)) for i in range(3)], fps=2.0, max_pixels=112 * 112),
        ]
    )
    assert clip.embedding.grid_thw[0] == 3  # 3 s at 2 fps = 6 frames = 3 temporal patches
    assert frames.embedding.grid_thw[0] == 2  # 3 frames, padded to 4
    for result in (clip, frames):
        grid = result.embedding.grid_thw
        assert result.embedding.rows == spec.rows_for_grid(grid) == features(result).shape[0]
        assert grid[1] * grid[2] * 14 * 14 <= 112 * 112


def test_bad_videos_are_refused_per_item(encoder):
    bad, mixed, good = encoder.encode_videos(
        [
            VideoInput(data=b"garbage", fps=2.0, max_pixels=12544),
            VideoInput(frames=[make_png(64, 48), make_png(32, 32)], fps=2.0, max_pixels=12544),
            VideoInput(data=make_video(seconds=1), fps=2.0, max_pixels=12544),
        ]
    )
    assert bad.embedding is None and "not a decodable video" in bad.error and bad.status == 400
    assert mixed.embedding is None and "same size" in mixed.error
    assert good.embedding is not None
