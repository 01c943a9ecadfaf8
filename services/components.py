"""The component services a track may have besides its LLM, by kind: what `components:` in a track's config names
(`vision_encoder`, `audio_encoder`, `audio_decoder`, `vision_decoder`). The gateway depends on each of a track's;
the benchmarks serve one at a time."""

from __future__ import annotations

from services.audio_decoder import audio_decoder_service
from services.audio_encoder import audio_encoder_service
from services.vision_decoder import vision_decoder_service
from services.vision_encoder import vision_encoder_service

# component kind -> the factory of its service, from a track's config
COMPONENT_SERVICES = {
    "vision_encoder": vision_encoder_service,
    "audio_encoder": audio_encoder_service,
    "audio_decoder": audio_decoder_service,
    "vision_decoder": vision_decoder_service,
}
