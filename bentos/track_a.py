"""Track A (VLM) bento: VisionEncoder -> LLM (HyperCLOVAX-SEED-Think-32B), behind the gateway (/a/v1, /v1).

GPU placement (configs/tracks/a.yaml): the gateway takes none; BentoML assigns the dependencies GPUs in the order
of their attribute names: `a_llm` gets the first `tensor_parallel_size` GPUs, `a_vision_encoder` the next one.
"""

from bentos.args import deployment
from services.gateway import gateway_service

DEPLOYMENT = deployment("a")
Gateway = gateway_service(DEPLOYMENT)
