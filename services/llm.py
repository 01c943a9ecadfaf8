"""LLM component: vLLM's OpenAI server for the track's HyperCLOVAX model, behind BentoML's reverse proxy.

The engine takes the vision encoder's precomputed embeddings (`image_embeds` content parts), so token ids,
prefix caching and `thinking_token_budget` work as for text.
"""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.vllm_args import vllm_server_command


def llm_service(config: TrackConfig) -> type:
    llm = config.llm
    resources = {"gpu": llm.tensor_parallel_size, **({"gpu_type": llm.gpu_type} if llm.gpu_type else {})}

    @bentoml.service(
        name="LLM",
        resources=resources,
        traffic={"timeout": llm.timeout_s},
        endpoints={"livez": "/health", "readyz": "/health"},
        http={"proxy_port": llm.port},
        envs=[{"name": k, "value": v} for k, v in llm.env.items()],
    )
    class LLM:
        def __command__(self) -> list[str]:
            return vllm_server_command(config)

    return LLM
