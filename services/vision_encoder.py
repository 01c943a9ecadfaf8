"""Vision encoder component: the Qwen2.5-VL tower, with adaptive batching across concurrent requests."""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.media import decode_image
from hcxserve.protocol.errors import MediaError
from hcxserve.protocol.payloads import ImageEmbedding, ImageEncoding, ImageInput


def vision_encoder_service(config: TrackConfig) -> type:
    cfg = config.vision_encoder
    resources = {"gpu": cfg.gpus, **({"gpu_type": cfg.gpu_type} if cfg.gpu_type else {})}

    @bentoml.service(name="VisionEncoder", resources=resources, traffic={"timeout": cfg.timeout_s})
    class VisionEncoder:
        def __init__(self) -> None:
            # torch is imported here, not at module level: every process of the bento (gateway, LLM proxy,
            # circus) imports this module, and torch alone costs each of them ~400 MB of RSS.
            import torch

            from hcxserve.models.vision_tower import VisionTower

            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            self.tower = VisionTower.from_pretrained(
                config.component_dir("ve"),
                device=cfg.device,
                dtype=cfg.dtype,
                attn_implementation=cfg.attn_implementation,
            )

        @bentoml.api(batchable=True, max_batch_size=cfg.max_batch_size, max_latency_ms=cfg.max_latency_ms)
        def encode(self, images: list[ImageInput]) -> list[ImageEncoding]:
            results: list[ImageEncoding | None] = [None] * len(images)
            decoded, positions = [], []
            for i, item in enumerate(images):
                try:
                    decoded.append(decode_image(item.data, config.media))
                    positions.append(i)
                except MediaError as exc:  # one bad image must not fail the others in the batch
                    results[i] = ImageEncoding(error=exc.message.removeprefix("image: "))
            for i, encoded in zip(positions, self.tower.encode(decoded)):
                rows, dim = encoded.features.shape
                results[i] = ImageEncoding(
                    embedding=ImageEmbedding(
                        embeds_b64=encoded.to_b64(),
                        rows=rows,
                        dim=dim,
                        dtype=str(encoded.features.dtype),
                        grid_thw=encoded.grid_thw,
                    )
                )
            return results

    return VisionEncoder
