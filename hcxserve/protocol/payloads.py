"""Typed messages between the gateway and the component services.

BentoML carries them between processes; none of them is ever written to storage.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ImageInput(BaseModel):
    """One already-fetched image; the encoder decodes and preprocesses it."""

    data: bytes = Field(repr=False)


class ImageEmbedding(BaseModel):
    """Vision-tower output for one image, in the form vLLM's `image_embeds` content part takes.

    `embeds_b64` is base64 of `torch.save(tensor)` of shape (rows, dim): the ViT merger output, before the
    projector (the LLM applies it). `grid_thw` is in patch units; rows == t*h*w / merge**2.
    """

    embeds_b64: str = Field(repr=False)
    rows: int
    dim: int
    dtype: str
    grid_thw: tuple[int, int, int]


class ImageEncoding(BaseModel):
    """Per-image result of a (batched) encode call: an embedding, or why this one image was refused."""

    embedding: ImageEmbedding | None = None
    error: str | None = None
