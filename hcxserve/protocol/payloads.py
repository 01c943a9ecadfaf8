"""Typed messages between the gateway and the component services.

BentoML carries them between processes; none of them is ever written to storage.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


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
    projector (the LLM applies it). `grid_thw` is in patch units; rows == t*h*w / merge**2.
    """

    embeds_b64: str = Field(repr=False)
    rows: int
    dim: int
    dtype: str
    grid_thw: tuple[int, int, int]


class VisionEncoding(BaseModel):
    """Per-item result of an encode call: an embedding, or why this one image or video was refused."""

    embedding: VisionEmbedding | None = None
    error: str | None = None
    status: int = 400  # of the client error (413 when over a limit)
