"""Vision decoder component of a track (B): the image the LLM drew -> a PNG, batched across concurrent requests."""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.protocol.payloads import GeneratedImage, ImageRequest
from services.dependencies import batching


def vision_decoder_service(track: TrackConfig) -> type:
    cfg = track.components.vision_decoder

    @bentoml.service(
        name=track.service_name("vision_decoder"), resources=cfg.resources(), traffic={"timeout": cfg.timeout_s}
    )
    class VisionDecoder:
        def __init__(self) -> None:
            from hcxserve.decoders.vision import VisionDecoderPipeline

            self.pipeline = VisionDecoderPipeline.from_pretrained(track.component_dir(cfg.folder), cfg)

        @bentoml.api(**batching(cfg))
        def generate(self, requests: list[ImageRequest]) -> list[GeneratedImage]:
            return self.pipeline.generate(requests)

    return VisionDecoder
