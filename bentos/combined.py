"""Both tracks behind one gateway, as OmniServe's default deployment: /a/v1 (Think-32B), /b/v1 (Omni-8B), and /v1
for either model by name (the default track, A, when the request names none).

GPU placement: the gateway takes none; then `a_llm` (2), `a_vision_encoder`, `b_audio_decoder`, `b_audio_encoder`,
`b_llm`, `b_vision_decoder`, `b_vision_encoder` (1 each): eight GPUs with configs/tracks/, one with the `single_gpu`
profile.
"""

from bentos.args import deployment
from services.gateway import gateway_service

DEPLOYMENT = deployment("a", "b")
Gateway = gateway_service(DEPLOYMENT)
