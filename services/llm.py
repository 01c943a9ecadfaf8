"""LLM component of a track: vLLM's OpenAI server for its HyperCLOVAX model, behind BentoML's reverse proxy,
started again if it dies (`hcxserve.llm.supervisor`).

The engine takes the encoders' precomputed embeddings (`image_embeds`, `audio_embeds` content parts), so token
ids, prefix caching and `thinking_token_budget` work as for text.
"""

from __future__ import annotations

import bentoml

from hcxserve.config import TrackConfig
from hcxserve.llm.args import supervised_command


def llm_service(track: TrackConfig) -> type:
    llm = track.llm

    @bentoml.service(
        name=track.service_name("llm"),
        resources=llm.resources(),
        traffic={"timeout": llm.timeout_s},
        # liveness is vLLM's own /health (through BentoML's proxy); readiness is BentoML's /readyz, ready once the
        # proxy has seen vLLM healthy. Probing readiness through the proxy logged an ERROR for every probe that gave
        # up while vLLM was still starting.
        endpoints={"livez": "/health"},
        http={"proxy_port": llm.port},
        envs=[{"name": k, "value": v} for k, v in llm.env.items()],
    )
    class LLM:
        def __command__(self) -> list[str]:
            return supervised_command(track)

    return LLM
