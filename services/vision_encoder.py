"""Vision encoder component of a track: the Qwen2.5-VL tower (+ on track B its projector and TA-Tok). Images are
batched across concurrent requests; videos are decoded and sampled here, next to the accelerator."""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.protocol.payloads import ImageInput, VideoInput, VisionEncoding
from services.dependencies import batching


def vision_encoder_service(track: TrackConfig) -> type:
    cfg = track.components.vision_encoder

    @bentoml.service(
        name=track.service_name("vision_encoder"), resources=cfg.resources(), traffic={"timeout": cfg.timeout_s}
    )
    class VisionEncoder:
        def __init__(self) -> None:
            from hcxserve.encoders.vision import VisionEncoderPipeline

            self.pipeline = VisionEncoderPipeline.from_pretrained(track.component_dir(cfg.folder), cfg, track.media)

        @bentoml.api(**batching(cfg))
        def encode(self, images: list[ImageInput]) -> list[VisionEncoding]:
            return self.pipeline.encode(images)

        @bentoml.api
        def encode_videos(self, videos: list[VideoInput]) -> list[VisionEncoding]:
            return self.pipeline.encode_videos(videos)

    return VisionEncoder
