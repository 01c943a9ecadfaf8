"""The vision decoder's work: the image the LLM drew (ratio + 729 codes) -> a PNG.

Each request is checked alone (ratio, codes, steps, guidance, seed: a bad one is refused, the others go on); the
rest are generated together, one forward pass per step for requests of the same size and sampling options.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from hcxserve.config import VisionDecoderConfig
from hcxserve.encoders import ItemRefused, encode_batch
from hcxserve.protocol.payloads import GeneratedImage, ImageRequest


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class VisionDecoderPipeline:
    def __init__(self, decoder, cfg: VisionDecoderConfig) -> None:
        self.decoder, self.cfg = decoder, cfg

    @classmethod
    def from_pretrained(cls, vd_dir: Path, cfg: VisionDecoderConfig) -> VisionDecoderPipeline:
        from hcxserve.models import apply_process_settings  # here, not at module level (see hcxserve.encoders.vision)
        from hcxserve.models.vision_decoder import VisionDecoder

        decoder = VisionDecoder.from_pretrained(vd_dir, device=cfg.device, dtype=cfg.dtype,
                                                max_batch_size=cfg.max_batch_size)  # fmt: skip
        apply_process_settings(cfg)
        return cls(decoder, cfg)

    def generate(self, requests: list[ImageRequest]) -> list[GeneratedImage]:
        def refused(exc: ItemRefused) -> GeneratedImage:
            return GeneratedImage(error=exc.message, status=exc.status)

        return encode_batch(requests, self._prepare, self._generate, refused)

    def _prepare(self, request: ImageRequest):
        """(codes, size, steps, guidance, seed) of one request, or ItemRefused."""
        import secrets

        from hcxserve.models.vision_decoder import VisionDecoderInputError, size_for_ratio

        cfg = self.cfg
        steps = cfg.steps if request.steps is None else request.steps
        guidance = cfg.guidance_scale if request.guidance_scale is None else request.guidance_scale
        if not 1 <= steps <= cfg.max_steps:
            raise ItemRefused(f"steps must be between 1 and {cfg.max_steps}, not {steps}")
        if not (math.isfinite(guidance) and 0 <= guidance <= 10):
            raise ItemRefused(f"guidance_scale must be between 0 and 10, not {guidance}")
        if request.seed is not None and not 0 <= request.seed < 2**63:
            raise ItemRefused(f"seed must be in [0, 2**63), not {request.seed}")
        try:
            size = size_for_ratio(request.ratio)
            codes = self.decoder.check_codes(request.codes, 0)
        except VisionDecoderInputError as exc:
            raise ItemRefused(str(exc).removeprefix("image 0: ")) from None
        seed = secrets.randbits(63) if request.seed is None else request.seed
        return codes, size, steps, float(guidance), seed

    def _generate(self, prepared: list) -> list[GeneratedImage]:
        results: list[GeneratedImage | None] = [None] * len(prepared)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, (_, _, steps, guidance, _) in enumerate(prepared):
            groups.setdefault((steps, guidance), []).append(i)
        for (steps, guidance), positions in groups.items():
            images = self.decoder.generate(
                [prepared[i][0] for i in positions],
                [prepared[i][1] for i in positions],
                steps=steps,
                guidance_scale=guidance,
                seeds=[prepared[i][4] for i in positions],
            )
            for i, image in zip(positions, images):
                width, height = image.size
                results[i] = GeneratedImage(png=png(image), width=width, height=height, seed=prepared[i][4])
        return results
