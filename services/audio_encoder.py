"""Audio encoder component of a track (B): clips decoded and resampled here, next to the accelerator, then the
Qwen2-Audio encoder + projector and the CosyVoice tokenizer, batched across concurrent requests."""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.protocol.payloads import AudioEncoding, AudioInput
from services.dependencies import batching


def audio_encoder_service(track: TrackConfig) -> type:
    cfg = track.components.audio_encoder

    @bentoml.service(
        name=track.service_name("audio_encoder"), resources=cfg.resources(), traffic={"timeout": cfg.timeout_s}
    )
    class AudioEncoder:
        def __init__(self) -> None:
            from hcxserve.encoders.audio import AudioEncoderPipeline

            self.pipeline = AudioEncoderPipeline.from_pretrained(track.component_dir(cfg.folder), cfg)

        @bentoml.api(**batching(cfg))
        def encode(self, clips: list[AudioInput]) -> list[AudioEncoding]:
            return self.pipeline.encode(clips)

    return AudioEncoder
