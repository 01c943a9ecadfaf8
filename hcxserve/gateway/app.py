"""The gateway's HTTP app: OpenAI's chat-completions API for every track of a deployment.

Routes: `POST {route}/chat/completions` and `GET {route}/models` for each track's own prefixes (`/a/v1`, `/b/v1`,
as OmniServe), and `/v1/...`, where a request goes to the track whose model it names (any served model, or an
alias), the default track when it names none; `GET /health`. BentoML adds `/readyz` (ready when every component
is), `/livez` and `/metrics`. The router only parses the body, picks the track's serving and renders JSON or SSE;
everything else lives in `hcxserve.gateway.serving`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hcxserve.config import Deployment
from hcxserve.gateway.serving import ChatCompletionServing
from hcxserve.protocol.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    internal_error,
    invalid_request_from_validation,
)
from hcxserve.protocol.openai import ChatCompletionRequest, ModelList

logger = logging.getLogger(__name__)

Servings = Callable[[], Mapping[str, ChatCompletionServing]]  # the worker's servings by track, made at start-up


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


async def _respond(serving: ChatCompletionServing, body: ChatCompletionRequest):
    result = await serving.create(body)
    if isinstance(result, pydantic.BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(deployment: Deployment, servings: Servings) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    max_body = deployment.max_body_bytes()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(internal_error())

    def track_routes(track: str) -> None:
        async def chat_completions(request: Request):
            return await _respond(servings()[track], await _parse_request(request, max_body))

        async def models():
            return JSONResponse(ModelList(data=[servings()[track].model_card()]).model_dump())

        for route in deployment.tracks[track].routes:
            app.add_api_route(f"{route}/chat/completions", chat_completions, methods=["POST"])
            app.add_api_route(f"{route}/models", models, methods=["GET"])

    async def any_model_chat_completions(request: Request):
        body = await _parse_request(request, max_body)
        by_track = servings()
        if not body.model:
            return await _respond(by_track[deployment.default_track], body)
        serving = next((s for s in by_track.values() if body.model in s.model_names), None)
        if serving is None:
            served = ", ".join(repr(by_track[t].model_name) for t in deployment.served)
            raise NotFoundError(
                f"The model {body.model!r} does not exist; this endpoint serves {served}.", param="model"
            )
        return await _respond(serving, body)

    async def all_models():
        by_track = servings()
        return JSONResponse(ModelList(data=[by_track[t].model_card() for t in deployment.served]).model_dump())

    async def health():
        by_track = servings()
        states = await asyncio.gather(*(by_track[t].llm.healthy() for t in deployment.served))
        tracks = {t: "ok" if ok else "unavailable" for t, ok in zip(deployment.served, states)}
        healthy = all(states)
        body = {"status": "ok" if healthy else "unavailable", "tracks": tracks}
        return JSONResponse(body, status_code=200 if healthy else 503)

    # /v1 first: `bentoml build` labels the bento with the first chat-completions route (BentoCloud's playground)
    app.add_api_route("/v1/chat/completions", any_model_chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", all_models, methods=["GET"])
    for track in deployment.served:
        track_routes(track)
    app.add_api_route("/health", health, methods=["GET"])
    return app
