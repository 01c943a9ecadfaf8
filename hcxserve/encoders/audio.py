"""The audio encoder's work (track B): clips (and video files, for their sound track) decoded and resampled here,
next to the accelerator, then the Qwen2-Audio encoder + projector (+ MambaMia for video sound tracks) and the
CosyVoice tokenizer over the whole batch."""

from __future__ import annotations

from pathlib import Path

from hcxserve.config import AudioEncoderConfig
from hcxserve.encoders import ItemRefused, encode_batch
from hcxserve.media.audio import AudioDecodeError, AudioTooLongError, decode_audio
from hcxserve.protocol.payloads import AudioEmbedding, AudioEncoding, AudioInput, encode_tensor


class AudioEncoderPipeline:
    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def from_pretrained(cls, ae_dir: Path, cfg: AudioEncoderConfig) -> AudioEncoderPipeline:
        import torch  # here, not at module level (see hcxserve.encoders.vision)

        from hcxserve.models import resolve_device
        from hcxserve.models.audio_encoder import AudioEncoderModel

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return cls(
            AudioEncoderModel.from_pretrained(
                ae_dir, device=resolve_device(cfg.device), dtype=cfg.dtype, attn_implementation=cfg.attn_implementation
            )
        )

    def encode(self, clips: list[AudioInput]) -> list[AudioEncoding]:
        def decode(clip: AudioInput):
            try:
                return decode_audio(clip.data, max_seconds=clip.max_seconds, min_seconds=clip.min_seconds)
            except AudioDecodeError as exc:
                raise ItemRefused(str(exc), 413 if isinstance(exc, AudioTooLongError) else 400) from None

        def encode(decoded: list) -> list[AudioEncoding]:
            encoded = self.model.encode([d.samples for d in decoded], from_video=[d.from_video for d in decoded])
            return [_encoding(e) for e in encoded]

        return encode_batch(clips, decode, encode, lambda exc: AudioEncoding(error=exc.message, status=exc.status))


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
