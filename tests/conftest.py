"""Shared fixtures: the embedded default model, test images and a local HTTP server for media URLs."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from pathlib import Path

import pytest

from hcxserve.config import PROJECT_ROOT

EMBEDDED_TRACK_A = PROJECT_ROOT / "models" / "embedded" / "track_a"
EMBEDDED_TRACK_B = PROJECT_ROOT / "models" / "embedded" / "track_b"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread, and a loaded machine makes more threads far slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def track_a_model_dir() -> Path:
    if not (EMBEDDED_TRACK_A / "manifest.json").exists():
        pytest.fail(f"{EMBEDDED_TRACK_A} is missing: run `make model` (the README's test command does)")
    return EMBEDDED_TRACK_A


@pytest.fixture(scope="session")
def track_b_model_dir() -> Path:
    if not (EMBEDDED_TRACK_B / "manifest.json").exists():
        pytest.fail(f"{EMBEDDED_TRACK_B} is missing: run `make model` (the README's test command does)")
    return EMBEDDED_TRACK_B


def make_png(width: int = 64, height: int = 48, color=(200, 30, 30), mode: str = "RGB") -> bytes:
    from PIL import Image

    image = Image.new(mode, (width, height), color if mode == "RGB" else (*color, 128))
    for x in range(width // 2):  # some structure, so different images encode differently
        image.putpixel((x, x % height), (0, 0, 255) if mode == "RGB" else (0, 0, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """Random pixels: a PNG about as large as the raw image (3 bytes a pixel), for size limits and large uploads."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_photo(width: int = 448, height: int = 336) -> bytes:
    """A picture with shapes, edges and gradients (closer to a photo than a flat test card)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    sky = np.stack([90 + 60 * y / height, 140 + 40 * x / width, 200 - 50 * y / height], axis=-1)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 8, height // 8, width // 3, height // 3], fill=(250, 220, 60))
    draw.rectangle([width // 2, height // 2, width - 20, height - 10], fill=(120, 60, 30))
    draw.polygon(
        [(width // 2, height // 2), (3 * width // 4, height // 4), (width - 20, height // 2)], fill=(170, 20, 20)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_audio(
    seconds: float = 2.0, rate: int = 22050, fmt: str = "WAV", freq: float = 440.0, channels: int = 1
) -> bytes:
    """A tone (with a little seeded noise) in any container soundfile writes: WAV, MP3, FLAC, OGG."""
    import numpy as np
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(int(freq)).normal(0, 0.02, t.shape)
    signal = (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)
    if channels > 1:
        signal = np.stack([signal] * channels, axis=1)
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, rate, format=fmt)
    return buffer.getvalue()


def make_av_media(
    container: str = "mp4", codec: str = "aac", seconds: float = 2.0, rate: int = 44100, video: bool = False
) -> bytes:
    """Audio in containers libsndfile cannot read (M4A/AAC, WebM/Opus, ADTS), optionally with a video stream
    (a video file with a sound track), written with PyAV."""
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        sound = out.add_stream(codec, rate=rate, layout="stereo")
        if video:
            picture = out.add_stream("mpeg4", rate=10, width=64, height=48, pix_fmt="yuv420p")
            for i in range(int(seconds * 10)):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10 % 256, np.uint8), format="rgb24")
                out.mux(picture.encode(frame))
            out.mux(picture.encode(None))
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        out.mux(sound.encode(frame))
        out.mux(sound.encode(None))
    return buffer.getvalue()


VIDEO_CODECS = {"mp4": "mp4v", "webm": "VP80"}


def make_video(seconds: float = 2, fps: int = 10, width: int = 64, height: int = 48, container: str = "mp4") -> bytes:
    """A small video whose colour changes over time (OpenCV's bundled FFmpeg writes it)."""
    import tempfile

    import cv2
    import numpy as np

    with tempfile.NamedTemporaryFile(suffix=f".{container}") as handle:
        fourcc = cv2.VideoWriter_fourcc(*VIDEO_CODECS[container])
        writer = cv2.VideoWriter(handle.name, fourcc, fps, (width, height))
        for i in range(int(seconds * fps)):
            frame = np.full((height, width, 3), (i * 7 % 256, 80, 255 - i * 7 % 256), dtype=np.uint8)
            writer.write(frame)
        writer.release()
        return open(handle.name, "rb").read()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """An S3-compatible store on loopback for the generated media (moto's server, bucket `media`); its `storage`
    holds the gateway settings that use it."""
    from hcxserve.tooling.testing import serve_s3

    server = serve_s3(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def media_server(tmp_path_factory):
    """Serves files from a temp folder on 127.0.0.1; yields (base_url, folder)."""
    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(make_png(64, 48, (220, 20, 20)))
    (root / "blue.png").write_bytes(make_png(96, 64, (20, 20, 220)))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (root / "clip.mp4").write_bytes(make_video(seconds=3, fps=10))
    (root / "tone.wav").write_bytes(make_audio(seconds=2.0))
    (root / "tone.mp3").write_bytes(make_audio(seconds=2.0, fmt="MP3", freq=660.0))
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


# (path, status) of every request the media server answered, in order
MEDIA_REQUESTS: list[tuple[str, int]] = []


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-") -> None:
        MEDIA_REQUESTS.append((self.path, int(code)))

    def log_message(self, *args) -> None:
        pass
