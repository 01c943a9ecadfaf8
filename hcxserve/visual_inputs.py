"""A request's images and videos: found once, limited, fetched, encoded by the vision encoder, and checked.

The modality is decided here, from the content part type, and carried as `kind` from then on (OmniServe decided
it three times, from URL extensions, and could disagree with itself).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hcxserve.config import MediaConfig
from hcxserve.media import MediaFetcher, PartRef, probe_image
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.errors import (
    APIError,
    InvalidRequestError,
    MediaError,
    PayloadTooLargeError,
    UpstreamError,
)
from hcxserve.protocol.openai import ChatCompletionRequest, ImagePart, ImageURLPart, VideoPart, VideoURLPart
from hcxserve.protocol.payloads import ImageInput, VideoInput, VisionEmbedding, VisionEncoding

logger = logging.getLogger(__name__)

ImageEncoder = Callable[[list[ImageInput]], Awaitable[Sequence[VisionEncoding]]]
VideoEncoder = Callable[[list[VideoInput]], Awaitable[Sequence[VisionEncoding]]]
Kind = Literal["image", "video"]


@dataclass(frozen=True)
class VisualRef(PartRef):
    kind: Kind
    content: Any  # the content part


@dataclass(frozen=True)
class VisualEmbedding:
    kind: Kind
    embedding: VisionEmbedding

    def upstream_part(self) -> dict[str, Any]:
        """vLLM's `image_embeds` / `video_embeds` content part."""
        field = f"{self.kind}_embeds"
        item: dict[str, Any] = {
            field: self.embedding.embeds_b64,
            f"{self.kind}_grid_thw": list(self.embedding.grid_thw),
        }
        if self.embedding.discrete_codes is not None:
            item[f"discrete_{self.kind}_codes"] = self.embedding.discrete_codes
        return {"type": field, field: item}


async def call_encoder(encoder: Callable[[list], Awaitable[Sequence]], inputs: list, name: str) -> Sequence:
    """One batched encoder call; anything but a client error becomes a 502 without internals."""
    try:
        results = await encoder(inputs)
    except APIError:
        raise
    except Exception:
        logger.exception("%s call failed", name)
        raise UpstreamError(f"The {name} failed to process the request.") from None
    if len(results) != len(inputs):
        raise UpstreamError(f"The {name} returned a wrong number of results.")
    return results


def check_count(refs: Sequence[PartRef], limit: int, what: str, code: str | None = None) -> None:
    if len(refs) > limit:
        raise InvalidRequestError(
            f"too many {what}: {len(refs)} (at most {limit} per request)",
            param="messages",
            code=code or f"too_many_{what}",
        )


def embedding_of(ref: PartRef, result):
    """The embedding an encoder returned for one part, or the client error it reported instead (413 when the part
    was over a limit)."""
    if result.error is not None or result.embedding is None:
        error_type = PayloadTooLargeError if result.status == 413 else MediaError
        raise error_type(f"{ref.param}: {result.error or 'could not be encoded'}", param=ref.param)
    return result.embedding


def find_visual_refs(request: ChatCompletionRequest) -> list[VisualRef]:
    refs = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, (ImageURLPart, ImagePart)):
                    refs.append(VisualRef(i, j, "image", part))
                elif isinstance(part, (VideoURLPart, VideoPart)):
                    refs.append(VisualRef(i, j, "video", part))
    return refs


class VisualInputs:
    def __init__(
        self,
        config: MediaConfig,
        *,
        fetcher: MediaFetcher,
        spec: VisionTowerSpec,
        encode_images: ImageEncoder,
        encode_videos: VideoEncoder,
    ) -> None:
        self.config = config
        self.fetcher = fetcher
        self.spec = spec
        self.encode_images = encode_images
        self.encode_videos = encode_videos

    async def embed(self, request: ChatCompletionRequest) -> dict[tuple[int, int], VisualEmbedding]:
        refs = find_visual_refs(request)
        images = [r for r in refs if r.kind == "image"]
        videos = [r for r in refs if r.kind == "video"]
        check_count(images, self.config.max_images_per_request, "images")
        check_count(videos, self.config.max_videos_per_request, "videos")
        image_results, video_results = await asyncio.gather(self._images(images), self._videos(videos))
        out = {}
        for ref, result in [*zip(images, image_results), *zip(videos, video_results)]:
            embedding = embedding_of(ref, result)
            self._check_embedding(ref.kind, embedding)
            out[ref.key] = VisualEmbedding(ref.kind, embedding)
        return out

    async def _images(self, refs: list[VisualRef]) -> Sequence[VisionEncoding]:
        if not refs:
            return []
        urls = [r.content.image_url.url if isinstance(r.content, ImageURLPart) else r.content.image for r in refs]
        images = await asyncio.gather(*(self._fetch_image(url, r.param) for url, r in zip(urls, refs)))
        return await call_encoder(self.encode_images, [ImageInput(data=data) for data in images], "vision encoder")

    async def _fetch_image(self, url: str, param: str) -> bytes:
        """Fetch, and refuse a non-image or an over-sized one before any encoder work (header-only check)."""
        data = (await self.fetcher.fetch(url, param=param)).data
        probe_image(data, self.config, param=param)
        return data

    async def _videos(self, refs: list[VisualRef]) -> Sequence[VisionEncoding]:
        if not refs:
            return []
        inputs = await asyncio.gather(*(self._video_input(ref) for ref in refs))
        return await call_encoder(self.encode_videos, list(inputs), "vision encoder (video)")

    async def _video_input(self, ref: VisualRef) -> VideoInput:
        part = ref.content
        # clients may ask for fewer frames or pixels than the server's budget, never more
        fps = min(part.fps or self.config.video_fps, self.config.video_fps)
        max_pixels = min(part.max_pixels or self.config.video_max_pixels, self.config.video_max_pixels)
        source = part.video_url.url if isinstance(part, VideoURLPart) else part.video
        if isinstance(source, str):
            media = await self.fetcher.fetch(source, param=ref.param, max_bytes=self.config.max_video_bytes)
            return VideoInput(data=media.data, fps=fps, max_pixels=max_pixels)
        if len(source) > self.config.max_video_frames_given:
            raise InvalidRequestError(
                f"{ref.param}: {len(source)} frames, at most {self.config.max_video_frames_given} are accepted",
                param=ref.param,
                code="too_many_frames",
            )
        frames = await asyncio.gather(
            *(self._fetch_image(url, f"{ref.param}.video[{k}]") for k, url in enumerate(source))
        )
        return VideoInput(frames=list(frames), fps=fps, max_pixels=max_pixels)

    def _check_embedding(self, kind: Kind, embedding: VisionEmbedding) -> None:
        # vLLM's engine dies on embeddings whose rows disagree with their grid (and silently mis-places a smaller
        # grid), so nothing inconsistent may reach it.
        expected_rows = self.spec.rows_for_grid(embedding.grid_thw)
        codes_expected = self.spec.discrete and kind == "image"  # TA-Tok codes are for images, not videos
        if (
            embedding.rows != expected_rows
            or embedding.dim != self.spec.out_hidden_size
            or (embedding.discrete_codes is not None) != codes_expected
        ):
            logger.error(
                "encoder output %sx%s for grid %s, expected %sx%s",
                embedding.rows,
                embedding.dim,
                embedding.grid_thw,
                expected_rows,
                self.spec.out_hidden_size,
            )
            raise UpstreamError("The vision encoder returned malformed features.")
