"""Typed messages between the gateway and the component services.

BentoML carries them between processes; none of them is ever written to storage.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


def encode_tensor(tensor) -> str:
    """The wire form of `*_embeds` for vLLM: base64 of `torch.save` (vLLM loads it with weights_only=True)."""
    import io

    import pybase64
    import torch

    buffer = io.BytesIO()
    tensor = tensor.detach()
    # A row slice of a batch output is a view, and torch.save writes a view's entire storage: copy the rows out.
    # From an accelerator, .cpu() already copies just the view.
    torch.save(tensor.cpu() if tensor.device.type != "cpu" else tensor.clone(), buffer)
    # SIMD base64 straight from the buffer, no copy of it (bench_encoder_forward: 2.6-3.3x faster than stdlib base64)
    return pybase64.b64encode(buffer.getbuffer()).decode("ascii")


class ImageInput(BaseModel):
    """One already-fetched image; the encoder decodes and preprocesses it."""

    data: bytes = Field(repr=False)


class VideoInput(BaseModel):
    """One video: a fetched file to decode and sample (`data`), or already-fetched frames (`frames`)."""

    data: bytes | None = Field(None, repr=False)
    frames: list[bytes] | None = Field(None, repr=False)
    fps: float
    max_pixels: int


class VisionEmbedding(BaseModel):
    """Vision-tower output for one image or video, in the form vLLM's `image_embeds`/`video_embeds` parts take.

    `embeds_b64` is base64 of `torch.save(tensor)` of shape (rows, dim): the ViT merger output, before the
    projector on track A (the LLM applies it), after it on track B. `grid_thw` is in patch units;
    rows == t*h*w / merge**2. `discrete_codes`: TA-Tok codebook indices of an image (track B only).
    """

    embeds_b64: str = Field(repr=False)
    rows: int
    dim: int
    dtype: str
    grid_thw: tuple[int, int, int]
    discrete_codes: list[int] | None = Field(None, repr=False)


class VisionEncoding(BaseModel):
    """Per-item result of an encode call: an embedding, or why this one image or video was refused."""

    embedding: VisionEmbedding | None = None
    error: str | None = None
    status: int = 400  # of the client error (413 when over a limit)


class AudioInput(BaseModel):
    """One already-fetched audio file, or a video file for its sound track; the encoder decodes and resamples it
    (the container is told by its bytes, not by the client's `format`)."""

    data: bytes = Field(repr=False)
    max_seconds: float
    min_seconds: float = 0.0


class AudioEmbedding(BaseModel):
    """Audio-encoder output for one clip: projected continuous rows (25 per second, LLM-width, base64 of
    `torch.save`) and CosyVoice codebook indices (25 per second)."""

    embeds_b64: str = Field(repr=False)
    rows: int
    dim: int
    dtype: str
    discrete_codes: list[int] = Field(repr=False)
    duration_s: float


class AudioEncoding(BaseModel):
    embedding: AudioEmbedding | None = None
    error: str | None = None
    status: int = 400


class SpeechRequest(BaseModel):
    """Units to speak, and whose voice: a named speaker of the finetuned vocoder, or (zero-shot) the voice of a
    reference clip (any container; the decoder decodes it).

    A streamed answer asks again as units arrive, each time with all its units so far: `start_sample` is where the
    last answer stopped, and until `final` only the samples no later unit can change come back (raw pcm16). The
    decoder keeps nothing between calls, so they may go to any replica. A later part in a reference clip's voice
    sends the `speaker` vector the first part's answer gave instead of the clip.
    """

    units: list[int] = Field(repr=False)
    voice: str | None = None
    reference: bytes | None = Field(None, repr=False)
    speaker: list[float] | None = Field(None, repr=False)  # a zero-shot voice's speaker vector (SpeechAudio.speaker)
    format: str = "wav"
    start_sample: int = Field(0, ge=0)
    final: bool = True


# SpeechAudio.status of a request naming a voice the decoder does not have (the client's doing, unlike bad units)
UNKNOWN_VOICE = 404


class SpeechAudio(BaseModel):
    """The spoken units as a file in the requested format (pcm16: raw little-endian samples), or why not (`status`:
    400 for units, clips or formats it cannot take, `UNKNOWN_VOICE` for a voice it does not have). `samples`: how
    many came back (from `start_sample` on)."""

    data: bytes | None = Field(None, repr=False)
    sample_rate: int = 24000
    samples: int = 0
    speaker: list[float] | None = Field(None, repr=False)  # the reference clip's speaker vector, when it had one
    error: str | None = None
    status: int = 400


class ImageRequest(BaseModel):
    """An image the LLM drew: its ratio (`W:H`) and its 729 codes; sampling options (None: the deployment's)."""

    ratio: str
    codes: list[int] = Field(repr=False)
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


class GeneratedImage(BaseModel):
    """A PNG, or why the request was refused."""

    png: bytes | None = Field(None, repr=False)
    width: int = 0
    height: int = 0
    seed: int | None = None
    error: str | None = None
    status: int = 400
