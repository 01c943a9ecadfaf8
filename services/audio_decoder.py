"""Audio decoder component of a track (B): units -> speech, in a named voice or a reference clip's, batched across
concurrent requests."""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.protocol.payloads import SpeechAudio, SpeechRequest
from services.dependencies import batching


def audio_decoder_service(track: TrackConfig) -> type:
    cfg = track.components.audio_decoder

    @bentoml.service(
        name=track.service_name("audio_decoder"), resources=cfg.resources(), traffic={"timeout": cfg.timeout_s}
    )
    class AudioDecoder:
        def __init__(self) -> None:
            from hcxserve.decoders.audio import AudioDecoderPipeline

            self.pipeline = AudioDecoderPipeline.from_pretrained(track.component_dir(cfg.folder), cfg)

        @bentoml.api(**batching(cfg))
        def decode(self, requests: list[SpeechRequest]) -> list[SpeechAudio]:
            return self.pipeline.decode(requests)

        @bentoml.api
        def voices(self) -> list[str]:
            return self.pipeline.voices

    return AudioDecoder
