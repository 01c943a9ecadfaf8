"""Track A (VLM) bento: VisionEncoder -> LLM (HyperCLOVAX-SEED-Think-32B), behind TrackAGateway.

GPU placement: the gateway takes none; BentoML assigns the dependencies GPUs in the order of their attribute
names (`llm`, then `vision_encoder`): LLM gets the first `tensor_parallel_size` GPUs, VisionEncoder the next one.
"""

from hcxserve.config import load_track_config
from services.gateway import gateway_service
from services.llm import llm_service
from services.vision_encoder import vision_encoder_service

CONFIG = load_track_config("a")

VisionEncoder = vision_encoder_service(CONFIG)
LLM = llm_service(CONFIG)
TrackAGateway = gateway_service(CONFIG, name="TrackAGateway", llm_service_=LLM, vision_encoder_service=VisionEncoder)
