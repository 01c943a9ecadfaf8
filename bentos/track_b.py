"""Track B (Omni) bento: VisionEncoder (ViT + projector + TA-Tok) and AudioEncoder (Qwen2-Audio + projector +
CosyVoice tokenizer) -> LLM (HyperCLOVAX-SEED-Omni-8B) -> AudioDecoder (unit BigVGAN) and VisionDecoder (DiT + VAE),
behind the gateway (/b/v1, /v1).

GPU placement (configs/tracks/b.yaml): the gateway takes none; `b_audio_decoder`, `b_audio_encoder`, `b_llm`,
`b_vision_decoder`, `b_vision_encoder` get one GPU each, in that order.
"""

from bentos.args import deployment
from services.gateway import gateway_service

DEPLOYMENT = deployment("b")
Gateway = gateway_service(DEPLOYMENT)
