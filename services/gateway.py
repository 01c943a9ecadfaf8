"""Gateway (entry service) of a deployment: OpenAI's chat-completions API over every served track's components.

The class is made from the deployment: one `bentoml.depends` per component of each track (`a_llm`,
`a_vision_encoder`, `b_audio_encoder`, `b_llm`, `b_vision_encoder`), each a service named after its track
(`TrackA-LLM`, ...), so both tracks coexist in one bento. BentoML hands out GPUs to dependencies in the order of
these attribute names, after the entry (which takes none).
"""

from __future__ import annotations

import bentoml

from hcxserve.config import Deployment, TrackConfig
from hcxserve.gateway.app import build_app, middlewares
from hcxserve.gateway.cache_metrics import PrometheusCacheMetrics
from hcxserve.gateway.encoder_cache import track_caches
from hcxserve.gateway.fetch import MediaFetcher
from hcxserve.gateway.llm_client import LLMClient
from hcxserve.gateway.modalities import MediaInputs
from hcxserve.gateway.serving import ChatCompletionServing
from hcxserve.gateway.storage import media_store
from hcxserve.models.vision_spec import VisionTowerSpec
from services.components import COMPONENT_SERVICES
from services.dependencies import call_dependency, dependency_ready
from services.llm import llm_service


def track_services(track: TrackConfig) -> dict[str, type]:
    """The component services of one track, by kind."""
    services = {"llm": llm_service(track)}
    for kind in track.components_by_kind():
        services[kind] = COMPONENT_SERVICES[kind](track)
    return services


class _Gateway:
    """The gateway's behaviour; `gateway_service` adds the deployment's dependencies as class attributes."""

    deployment: Deployment
    components: dict[str, dict[str, type]]

    @bentoml.on_startup
    async def _start(self) -> None:
        self.servings: dict[str, ChatCompletionServing] = {}
        self.fetchers: list[MediaFetcher] = []
        cache_metrics, url_metrics = PrometheusCacheMetrics(), PrometheusCacheMetrics("hcx_url_cache")
        store = media_store(self.deployment.gateway.storage)
        for track in self.deployment.served_tracks():
            llm_service_ = self.components[track.track]["llm"]
            fetcher = MediaFetcher(track.media, name=track.name, cache_metrics=url_metrics)
            self.fetchers.append(fetcher)
            components = self._component_call(track.track)
            media = MediaInputs(
                track.llm.modalities,
                track.media,
                fetcher=fetcher,
                spec=VisionTowerSpec.from_dir(track.component_dir(track.components.vision_encoder.folder)),
                encode=components,
                track=track.track,
                caches=track_caches(track, cache_metrics),
            )
            llm = LLMClient.for_dependency(
                llm_service_.url, vllm_port=track.llm.port, runner_name=llm_service_.name, timeout=track.llm.timeout_s
            )
            probes = {
                track.service_name(kind): self._readiness(f"{track.track}_{kind}")
                for kind in track.components_by_kind()
            }
            self.servings[track.track] = ChatCompletionServing(
                track, self.deployment.gateway, llm=llm, media=media, components=components, store=store, probes=probes
            )

    def _readiness(self, attribute: str):
        async def probe() -> bool:
            return await dependency_ready(getattr(self, attribute))

        return probe

    def _component_call(self, track: str):
        async def call(component: str, method: str, *args):
            what = f"track {track.upper()} {component.replace('_', ' ')}"
            return await call_dependency(getattr(self, f"{track}_{component}"), method, *args, what=what)

        return call

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        for serving in self.servings.values():
            await serving.llm.aclose()
        for fetcher in self.fetchers:
            await fetcher.aclose()


def gateway_service(deployment: Deployment, *, name: str = "Gateway") -> type:
    components = {track.track: track_services(track) for track in deployment.served_tracks()}
    attributes = {
        f"{track}_{kind}": bentoml.depends(service)
        for track, services in components.items()
        for kind, service in services.items()
    }
    cls = type(name, (_Gateway,), {**attributes, "deployment": deployment, "components": components})
    app = build_app(deployment, lambda: bentoml.get_current_service().servings)
    service = bentoml.service(
        name=name, traffic={"timeout": deployment.gateway.timeout_s}, labels={"openai_endpoint": "/v1"}
    )(cls)
    for middleware, options in middlewares(deployment):
        service.add_asgi_middleware(middleware, **options)
    return bentoml.asgi_app(app, path="/")(service)
