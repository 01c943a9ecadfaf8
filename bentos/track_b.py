"""Track B (Omni) bento, understanding side: VisionEncoder (ViT + projector + TA-Tok) and AudioEncoder
(Qwen2-Audio + projector + CosyVoice tokenizer) -> LLM (HyperCLOVAX-SEED-Omni-8B), behind TrackBGateway.

GPU placement: the gateway takes none; BentoML assigns the dependencies GPUs in the order of their attribute
names (`audio_encoder`, `llm`, `vision_encoder`), one each with configs/track_b.yaml.
"""

from hcxserve.config import load_track_config
from services.audio_encoder import audio_encoder_service
from services.gateway import gateway_service
from services.llm import llm_service
from services.vision_encoder import vision_encoder_service

CONFIG = load_track_config("b")

VisionEncoder = vision_encoder_service(CONFIG)
AudioEncoder = audio_encoder_service(CONFIG)
LLM = llm_service(CONFIG)
TrackBGateway = gateway_service(
    CONFIG,
    name="TrackBGateway",
    llm_service_=LLM,
    vision_encoder_service=VisionEncoder,
    audio_encoder_service=AudioEncoder,
)
