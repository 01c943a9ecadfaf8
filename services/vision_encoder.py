"""Vision encoder component: the Qwen2.5-VL tower (+ on track B its projector and the TA-Tok discrete tokenizer,
as the converted `ve/` folder says). Images are batched across concurrent requests; videos are decoded and sampled
here (next to the accelerator) and encoded one by one."""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.media import decode_image
from hcxserve.protocol.errors import InvalidRequestError, MediaError
from hcxserve.protocol.payloads import ImageInput, VideoInput, VisionEmbedding, VisionEncoding
from hcxserve.video import pad_to_temporal_patch, sample_video
from services.dependencies import batching


def _encoding(encoded, discrete_codes: list[int] | None = None) -> VisionEncoding:
    rows, dim = encoded.features.shape
    return VisionEncoding(
        embedding=VisionEmbedding(
            embeds_b64=encoded.to_b64(),
            rows=rows,
            dim=dim,
            dtype=str(encoded.features.dtype),
            grid_thw=encoded.grid_thw,
            discrete_codes=discrete_codes,
        )
    )


def vision_encoder_service(config: TrackConfig) -> type:
    cfg = config.vision_encoder
    resources = {"gpu": cfg.gpus, **({"gpu_type": cfg.gpu_type} if cfg.gpu_type else {})}

    @bentoml.service(name="VisionEncoder", resources=resources, traffic={"timeout": cfg.timeout_s})
    class VisionEncoder:
        def __init__(self) -> None:
            # torch is imported here, not at module level: every process of the bento (gateway, LLM proxy,
            # circus) imports this module, and torch alone costs each of them ~400 MB of RSS.
            import torch

            from hcxserve.models.ta_tok import TATokEncoder
            from hcxserve.models.vision_tower import VisionTower

            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            ve_dir = config.component_dir("ve")
            options = dict(device=cfg.device, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
            self.tower = VisionTower.from_pretrained(ve_dir, **options)
            self.ta_tok = TATokEncoder.from_pretrained(ve_dir, **options) if self.tower.spec.discrete else None

        @bentoml.api(**batching(cfg))
        def encode(self, images: list[ImageInput]) -> list[VisionEncoding]:
            results: list[VisionEncoding | None] = [None] * len(images)
            decoded, positions = [], []
            for i, item in enumerate(images):
                try:
                    decoded.append(decode_image(item.data, config.media))
                    positions.append(i)
                except MediaError as exc:  # one bad image must not fail the others in the batch
                    results[i] = VisionEncoding(error=exc.message.removeprefix("image: "))
            codes = self.ta_tok.encode(decoded).tolist() if self.ta_tok is not None else [None] * len(decoded)
            for i, encoded, image_codes in zip(positions, self.tower.encode(decoded), codes):
                results[i] = _encoding(encoded, image_codes)
            return results

        @bentoml.api
        def encode_videos(self, videos: list[VideoInput]) -> list[VisionEncoding]:
            return [self._encode_video(video) for video in videos]

        def _encode_video(self, video: VideoInput) -> VisionEncoding:
            import numpy as np

            media = config.media
            try:
                if video.frames is not None:
                    images = [decode_image(frame, media, param="frame") for frame in video.frames]
                    if len({image.size for image in images}) > 1:
                        return VisionEncoding(error="all frames of a video must have the same size")
                    frames = pad_to_temporal_patch(np.stack([np.asarray(image) for image in images]))
                else:
                    frames = sample_video(
                        video.data,
                        fps=video.fps,
                        min_frames=media.video_min_frames,
                        max_frames=media.video_max_frames,
                        max_seconds=media.max_video_seconds,
                    ).frames
            except InvalidRequestError as exc:
                message = exc.message.removeprefix("video: ").removeprefix("frame: ")
                return VisionEncoding(error=message, status=exc.status_code)
            return _encoding(self.tower.encode_video(frames, max_pixels=video.max_pixels))

    return VisionEncoder
