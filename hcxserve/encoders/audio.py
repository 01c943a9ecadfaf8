"""The audio encoder's work (track B): clips (and video files, for their sound track) decoded and resampled here,
next to the accelerator, then the Qwen2-Audio encoder + projector (+ MambaMia for video sound tracks) and the
CosyVoice tokenizer over the whole batch."""

from __future__ import annotations

from concurrent.futures import Executor
from pathlib import Path

from hcxserve.config import AudioEncoderConfig
from hcxserve.encoders import ItemRefused, encode_batch, item_pool
from hcxserve.media.audio import AudioDecodeError, AudioTooLongError, decode_audio
from hcxserve.protocol.payloads import AudioEmbedding, AudioEncoding, AudioInput, encode_tensor


class AudioEncoderPipeline:
    def __init__(self, model, pool: Executor | None = None) -> None:
        self.model = model
        self.pool = pool  # decodes a batch's clips and serialises their results side by side (see item_pool)

    @classmethod
    def from_pretrained(cls, ae_dir: Path, cfg: AudioEncoderConfig) -> AudioEncoderPipeline:
        from hcxserve.models import apply_process_settings, resolve_device  # here (see hcxserve.encoders.vision)
        from hcxserve.models.audio_encoder import AudioEncoderModel

        model = AudioEncoderModel.from_pretrained(
            ae_dir, device=resolve_device(cfg.device), dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
        )
        apply_process_settings(cfg)
        return cls(model, item_pool(cfg.item_threads, cfg.max_batch_size))

    def encode(self, clips: list[AudioInput]) -> list[AudioEncoding]:
        def decode(clip: AudioInput):
            try:
                return decode_audio(clip.data, max_seconds=clip.max_seconds, min_seconds=clip.min_seconds)
            except AudioDecodeError as exc:
                raise ItemRefused(str(exc), 413 if isinstance(exc, AudioTooLongError) else 400) from None

        def encode(decoded: list) -> list:
            return self.model.encode([d.samples for d in decoded], from_video=[d.from_video for d in decoded])

        def refused(exc: ItemRefused) -> AudioEncoding:
            return AudioEncoding(error=exc.message, status=exc.status)

        return encode_batch(clips, decode, encode, refused, finish=_encoding, pool=self.pool)


def _encoding(encoded) -> AudioEncoding:
    rows, dim = encoded.continuous.shape
    return AudioEncoding(
        embedding=AudioEmbedding(
            embeds_b64=encode_tensor(encoded.continuous),
            rows=rows,
            dim=dim,
            dtype=str(encoded.continuous.dtype),
            discrete_codes=encoded.discrete.tolist(),
            duration_s=encoded.duration_s,
        )
    )
