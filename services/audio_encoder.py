"""Audio encoder component (track B): decodes and resamples clips here, next to the accelerator (a video file's
sound track too), then runs the Qwen2-Audio encoder + projector (+ the MambaMia compressor for video sound tracks)
and the CosyVoice tokenizer. Clips are batched across concurrent requests."""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.protocol.payloads import AudioEmbedding, AudioEncoding, AudioInput, encode_tensor
from services.dependencies import batching


def audio_encoder_service(config: TrackConfig) -> type:
    cfg = config.audio_encoder
    if cfg is None:
        raise ValueError(f"track {config.track} has no audio_encoder section")
    resources = {"gpu": cfg.gpus, **({"gpu_type": cfg.gpu_type} if cfg.gpu_type else {})}

    @bentoml.service(name="AudioEncoder", resources=resources, traffic={"timeout": cfg.timeout_s})
    class AudioEncoder:
        def __init__(self) -> None:
            # torch is imported here, not at module level (see services/vision_encoder.py)
            import torch

            from hcxserve.models import resolve_device
            from hcxserve.models.audio_encoder import AudioEncoderModel

            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            self.model = AudioEncoderModel.from_pretrained(
                config.component_dir("ae"),
                device=resolve_device(cfg.device),
                dtype=cfg.dtype,
                attn_implementation=cfg.attn_implementation,
            )

        @bentoml.api(**batching(cfg))
        def encode(self, clips: list[AudioInput]) -> list[AudioEncoding]:
            from hcxserve.audio import AudioDecodeError, AudioTooLongError, decode_audio

            results: list[AudioEncoding | None] = [None] * len(clips)
            decoded, positions = [], []
            for i, clip in enumerate(clips):
                try:
                    decoded.append(decode_audio(clip.data, max_seconds=clip.max_seconds))
                    positions.append(i)
                except AudioDecodeError as exc:  # one bad clip must not fail the others in the batch
                    status = 413 if isinstance(exc, AudioTooLongError) else 400
                    results[i] = AudioEncoding(error=str(exc), status=status)
            encoded_clips = self.model.encode([d.samples for d in decoded], from_video=[d.from_video for d in decoded])
            for i, encoded in zip(positions, encoded_clips):
                rows, dim = encoded.continuous.shape
                results[i] = AudioEncoding(
                    embedding=AudioEmbedding(
                        embeds_b64=encode_tensor(encoded.continuous),
                        rows=rows,
                        dim=dim,
                        dtype=str(encoded.continuous.dtype),
                        discrete_codes=encoded.discrete.tolist(),
                        duration_s=encoded.duration_s,
                    )
                )
            return results

    return AudioEncoder
