"""Gateway (entry service) of a track: OpenAI's chat-completions API over the track's component services.

Routes: `POST {prefix}/chat/completions` and `GET {prefix}/models` for each configured prefix (`/a/v1` and
`/v1` for track A), `GET /health`; BentoML adds `/readyz` (ready when every component is) and `/metrics`.
The router only parses JSON, resolves the serving object and renders JSON or SSE; everything else lives in
`hcxserve.serving`.
"""

from __future__ import annotations

import json
import logging

import bentoml
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hcxserve.audio_inputs import AudioInputs
from hcxserve.config import TrackConfig
from hcxserve.llm_client import LLMClient
from hcxserve.media import MediaFetcher
from hcxserve.models.vision_spec import VisionTowerSpec
from hcxserve.protocol.errors import (
    APIError,
    InvalidRequestError,
    PayloadTooLargeError,
    internal_error,
    invalid_request_from_validation,
)
from hcxserve.protocol.openai import ChatCompletionRequest
from hcxserve.serving import ChatCompletionServing
from hcxserve.visual_inputs import VisualInputs
from services.dependencies import call_dependency

logger = logging.getLogger(__name__)


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status_code)


async def _parse_request(request: Request, max_bytes: int) -> ChatCompletionRequest:
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise PayloadTooLargeError(f"request body is over the limit of {max_bytes} bytes")
    raw = await request.body()
    if len(raw) > max_bytes:
        raise PayloadTooLargeError(f"request body is over the limit of {max_bytes} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        raise invalid_request_from_validation(exc.errors(include_url=False)) from None


def build_openai_app(config: TrackConfig, get_serving) -> FastAPI:
    """`get_serving()` returns the worker's `ChatCompletionServing` (created at service start-up)."""
    app = FastAPI(title=f"HyperCLOVAX track {config.track.upper()}", docs_url=None, redoc_url=None, openapi_url=None)
    # inline (base64) media inflate by 4/3; leave room for the text around them
    media = config.media
    inline_media = (
        media.max_images_per_request * media.max_image_bytes
        + media.max_videos_per_request * media.max_video_bytes
        + media.max_audios_per_request * media.max_audio_bytes
    )
    max_body = inline_media * 4 // 3 + (8 << 20)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(internal_error())

    async def chat_completions(request: Request):
        result = await get_serving().create(await _parse_request(request, max_body))
        if isinstance(result, pydantic.BaseModel):
            return JSONResponse(result.model_dump())
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def models():
        return JSONResponse(get_serving().models().model_dump())

    async def health():
        healthy = await get_serving().llm.healthy()
        return JSONResponse({"status": "ok" if healthy else "unavailable"}, status_code=200 if healthy else 503)

    for prefix in config.gateway.route_prefixes:
        app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return app


def gateway_service(
    config: TrackConfig, *, name: str, llm_service_, vision_encoder_service, audio_encoder_service=None
) -> type:
    app = build_openai_app(config, lambda: bentoml.get_current_service().serving)

    @bentoml.asgi_app(app, path="/")
    @bentoml.service(name=name, traffic={"timeout": config.gateway.timeout_s}, labels={"openai_endpoint": "/v1"})
    class Gateway:
        vision_encoder = bentoml.depends(vision_encoder_service)
        llm = bentoml.depends(llm_service_)
        if audio_encoder_service is not None:
            audio_encoder = bentoml.depends(audio_encoder_service)

        @bentoml.on_startup
        async def _start(self) -> None:
            llm_url = llm_service_.url or f"http://127.0.0.1:{config.llm.port}"
            self.fetcher = MediaFetcher(config.media)
            spec = VisionTowerSpec.from_dir(config.component_dir("ve"))
            visual_inputs = VisualInputs(
                config.media,
                fetcher=self.fetcher,
                spec=spec,
                encode_images=lambda items: self._call("vision_encoder", "encode", items),
                encode_videos=lambda items: self._call("vision_encoder", "encode_videos", items),
            )
            audio_inputs = None
            if audio_encoder_service is not None:
                audio_inputs = AudioInputs(
                    config.media,
                    fetcher=self.fetcher,
                    embed_dim=spec.out_hidden_size,  # both encoders project to the LLM's width on track B
                    encode_audio=lambda items: self._call("audio_encoder", "encode", items),
                )
            llm = LLMClient.for_url(llm_url, runner_name=llm_service_.name, timeout=config.llm.timeout_s)
            self.serving = ChatCompletionServing(
                config, llm=llm, visual_inputs=visual_inputs, audio_inputs=audio_inputs
            )

        async def _call(self, dependency: str, method: str, items):
            return await call_dependency(getattr(self, dependency), method, items, what=dependency.replace("_", " "))

        @bentoml.on_shutdown
        async def _stop(self) -> None:
            await self.serving.llm.aclose()
            await self.fetcher.aclose()

    return Gateway
