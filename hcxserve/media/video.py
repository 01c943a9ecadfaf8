"""Video decoding and frame sampling (OmniServe's qwen-vl-utils rules), on OpenCV's bundled FFmpeg.

Frames are sampled at `fps` (2 by default) over the whole clip, at least `min_frames` and at most `max_frames`,
rounded down to a multiple of the ViT's temporal patch (2), evenly spaced. Only the chosen frames are decoded.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import numpy as np

from hcxserve.protocol.errors import MediaError, PayloadTooLargeError

TEMPORAL_PATCH = 2


@dataclass(frozen=True)
class SampledVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, T a multiple of TEMPORAL_PATCH
    duration_s: float
    source_fps: float


def frame_indices(total: int, source_fps: float, *, fps: float, min_frames: int, max_frames: int) -> list[int]:
    """Evenly spaced indices of the frames to keep (repeats allowed when the clip is shorter than min_frames)."""
    duration = total / source_fps if source_fps > 0 else 0.0
    wanted = round(duration * fps)
    wanted = max(min_frames, min(max_frames, wanted))
    wanted = max(TEMPORAL_PATCH, wanted - wanted % TEMPORAL_PATCH)
    return np.linspace(0, total - 1, wanted).round().astype(int).tolist()


def pad_to_temporal_patch(frames: np.ndarray) -> np.ndarray:
    """A list-of-frames video may have an odd count; repeat the last frame as the temporal patch needs pairs."""
    if len(frames) % TEMPORAL_PATCH:
        frames = np.concatenate([frames, frames[-1:]], axis=0)
    return frames


def sample_video(
    data: bytes, *, fps: float, min_frames: int, max_frames: int, max_seconds: float, param: str = "video"
) -> SampledVideo:
    import cv2

    with tempfile.NamedTemporaryFile(suffix=".video") as handle:
        handle.write(data)
        handle.flush()
        capture = cv2.VideoCapture(handle.name)
        try:
            if not capture.isOpened():
                raise MediaError(f"{param}: the data is not a decodable video", param=param)
            source_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
            if not math.isfinite(source_fps) or source_fps <= 0:
                source_fps = 25.0
            # count by grabbing (no decode): container frame counts are unreliable (webm often reports none)
            max_total = int(max_seconds * source_fps) + 1
            total = 0
            while capture.grab():
                total += 1
                if total > max_total:
                    raise PayloadTooLargeError(f"{param}: video is longer than {max_seconds:g} s", param=param)
            if total == 0:
                raise MediaError(f"{param}: the video has no decodable frames", param=param)
        finally:
            capture.release()
        wanted = frame_indices(total, source_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
        # a fresh capture for the second pass: seeking back is unreliable across containers
        capture = cv2.VideoCapture(handle.name)
        try:
            frames = _read_frames(capture, cv2, wanted, param)
        finally:
            capture.release()
    return SampledVideo(np.stack(frames), total / source_fps, source_fps)


def _read_frames(capture, cv2, indices: list[int], param: str) -> list[np.ndarray]:
    frames, position, last = [], -1, None
    for index in indices:
        while position < index:
            if not capture.grab():
                raise MediaError(f"{param}: the video ended early while decoding", param=param)
            position += 1
            last = None
        if last is None:
            ok, bgr = capture.retrieve()
            if not ok:
                raise MediaError(f"{param}: a video frame could not be decoded", param=param)
            last = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        frames.append(last)
    return frames
