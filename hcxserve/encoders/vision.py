"""The vision encoder's work: images and videos (files or frame lists) decoded and sampled here, next to the
accelerator, then the Qwen2.5-VL tower (+ on track B its projector and TA-Tok codes, as `ve/` says)."""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

from hcxserve.config import MediaConfig, VisionEncoderConfig
from hcxserve.encoders import ItemRefused, encode_batch, item_pool
from hcxserve.media.images import decode_image
from hcxserve.media.video import pad_to_temporal_patch, sample_video
from hcxserve.protocol.errors import InvalidRequestError
from hcxserve.protocol.payloads import ImageInput, VideoInput, VisionEmbedding, VisionEncoding


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


def _finish(encoded: tuple) -> VisionEncoding:
    return _encoding(*encoded)


def _refusal(exc: ItemRefused) -> VisionEncoding:
    return VisionEncoding(error=exc.message, status=exc.status)


def _client_error(exc: InvalidRequestError, *prefixes: str) -> ItemRefused:
    message = exc.message
    for prefix in prefixes:
        message = message.removeprefix(prefix)
    return ItemRefused(message, exc.status_code)


class VisionEncoderPipeline:
    def __init__(self, tower, ta_tok, media: MediaConfig, pool: Executor | None = None) -> None:
        self.tower = tower
        self.ta_tok = ta_tok
        self.media = media
        self.pool = pool  # decodes and preprocesses a batch's items side by side (see item_pool)

    @classmethod
    def from_pretrained(cls, ve_dir: Path, cfg: VisionEncoderConfig, media: MediaConfig) -> VisionEncoderPipeline:
        # The models, and so torch, are imported here, not at module level: every process of the bento (gateway,
        # LLM proxy, circus) imports the service modules, and torch alone costs each of them ~400 MB of RSS.
        from hcxserve.models import apply_process_settings
        from hcxserve.models.ta_tok import TATokEncoder
        from hcxserve.models.vision_tower import VisionTower

        options = dict(device=cfg.device, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)
        tower = VisionTower.from_pretrained(ve_dir, **options)
        ta_tok = TATokEncoder.from_pretrained(ve_dir, **options) if tower.spec.discrete else None
        apply_process_settings(cfg)
        return cls(tower, ta_tok, media, item_pool(cfg.item_threads, cfg.max_batch_size))

    def encode(self, images: list[ImageInput]) -> list[VisionEncoding]:
        """Images, batched: one bad image is refused alone."""
        return encode_batch(images, self._prepare, self._encode_prepared, _refusal, finish=_finish, pool=self.pool)

    def _prepare(self, item: ImageInput) -> tuple:
        """An image's decoding and preprocessing: the tower's patches and, on track B, TA-Tok's pixels."""
        try:
            image = decode_image(item.data, self.media)
        except InvalidRequestError as exc:
            raise _client_error(exc, "image: ") from None
        pixels = self.ta_tok.pixel_values([image]).to(self.ta_tok.device) if self.ta_tok is not None else None
        return self.tower.preprocess(image), pixels

    def _encode_prepared(self, prepared: list[tuple]) -> list[tuple]:
        import torch

        features = self.tower.encode_preprocessed([patches for patches, _ in prepared])
        if self.ta_tok is None:
            return [(f, None) for f in features]
        with torch.inference_mode():
            codes = self.ta_tok(torch.cat([pixels for _, pixels in prepared])).tolist()
        return list(zip(features, codes, strict=True))

    def encode_videos(self, videos: list[VideoInput]) -> list[VisionEncoding]:
        """Videos, one by one (each is already a batch of frames)."""

        def encode(videos: list) -> list:
            return [self.tower.encode_video(frames, max_pixels=max_pixels) for frames, max_pixels in videos]

        return encode_batch(videos, self._frames, encode, _refusal, finish=_encoding, pool=self.pool)

    def _frames(self, video: VideoInput):
        import numpy as np

        media = self.media
        try:
            if video.frames is not None:
                images = [decode_image(frame, media, param="frame") for frame in video.frames]
                if len({image.size for image in images}) > 1:
                    raise ItemRefused("all frames of a video must have the same size")
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
            raise _client_error(exc, "video: ", "frame: ") from None
        return frames, video.max_pixels
