import numpy as np
import pytest

from hcxserve.media.video import frame_indices, pad_to_temporal_patch, sample_video
from hcxserve.protocol.errors import MediaError, PayloadTooLargeError
from tests.conftest import make_video


@pytest.mark.parametrize(
    ("total", "fps", "expected_count"),
    [
        (250, 25.0, 20),  # 10 s at 2 fps
        (25, 25.0, 4),  # 1 s: raised to min_frames
        (30_000, 25.0, 170),  # 20 min: capped at max_frames
        (75, 25.0, 6),  # 3 s
        (3, 25.0, 4),  # fewer frames than min_frames: repeats
        (70, 20.0, 6),  # 3.5 s -> 7 frames -> even 6
    ],
)
def test_frame_indices(total, fps, expected_count):
    indices = frame_indices(total, fps, fps=2.0, min_frames=4, max_frames=170)
    assert len(indices) == expected_count and len(indices) % 2 == 0
    assert indices[0] == 0 and indices[-1] == total - 1 and indices == sorted(indices)


def test_odd_frame_lists_are_padded_to_pairs():
    frames = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    assert pad_to_temporal_patch(frames).shape[0] == 4
    assert pad_to_temporal_patch(frames[:2]).shape[0] == 2


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_sample_video(container):
    video = sample_video(
        make_video(seconds=3, fps=10, container=container), fps=2.0, min_frames=4, max_frames=16, max_seconds=60
    )
    assert video.frames.shape == (6, 48, 64, 3) and video.frames.dtype == np.uint8
    assert video.duration_s == pytest.approx(3.0)
    assert not np.array_equal(video.frames[0], video.frames[-1])  # the test clip changes over time


def test_bad_and_long_videos():
    with pytest.raises(MediaError):
        sample_video(b"not a video at all", fps=2, min_frames=4, max_frames=16, max_seconds=60)
    with pytest.raises(PayloadTooLargeError):
        sample_video(make_video(seconds=3, fps=10), fps=2, min_frames=4, max_frames=16, max_seconds=1)
