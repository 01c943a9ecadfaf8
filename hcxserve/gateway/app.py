"""The gateway's HTTP app: OpenAI's chat-completions API for every track of a deployment.

Routes: `POST {route}/chat/completions` and `GET {route}/models` for each track's own prefixes (`/a/v1`, `/b/v1`,
as OmniServe), and `/v1/...`, where a request goes to the track whose model it names (any served model, or an
alias), the default track when it names none; `GET /health` (each track and each of its components). BentoML adds
`/readyz` (ready when every component is), `/livez` and `/metrics`. The router only parses the body, picks the
track's serving and renders JSON or SSE; everything else lives in `hcxserve.gateway.serving`. `middlewares()` are
the ASGI layers around all of it (BentoML's routes included): error fallback, API keys, admission.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from hcxserve.config import Deployment
from hcxserve.gateway.admission import Admission
from hcxserve.gateway.auth import APIKeyAuth
from hcxserve.gateway.body import read_request
from hcxserve.gateway.fallback import ErrorFallback, route_refusal
from hcxserve.gateway.serving import ChatCompletionServing
from hcxserve.protocol.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    internal_error,
)
from hcxserve.protocol.openai import ChatCompletionRequest, ModelList

logger = logging.getLogger(__name__)

Servings = Callable[[], Mapping[str, ChatCompletionServing]]  # the worker's servings by track, made at start-up


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status_code)


async def _until_disconnected(request: Request) -> None:
    # the body has been read: what the server delivers next is the client going away
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(serving: ChatCompletionServing, body: ChatCompletionRequest, request: Request):
    """Run the request, cancelled (and with it the LLM's work on it) if the client goes away before its answer. A
    stream's later disconnects are the streaming response's: it stops reading, which closes the upstream stream."""
    work = asyncio.ensure_future(serving.create(body))
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        logger.info("client disconnected; its request was cancelled")
        return Response(status_code=499)  # nobody reads it
    result = work.result()
    if isinstance(result, pydantic.BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def middlewares(deployment: Deployment) -> list[tuple[type, dict[str, Any]]]:
    """ASGI middlewares around the whole gateway (BentoML's own routes, `/metrics` among them, included), outermost
    first: the error fallback, API keys, admission control."""
    gateway = deployment.gateway
    admission = dict(
        max_concurrent=gateway.max_concurrent_requests,
        max_queued=gateway.max_queued_requests,
        retry_after_s=gateway.retry_after_s,
    )
    return [(ErrorFallback, {}), (APIKeyAuth, {"auth": deployment.auth}), (Admission, admission)]


def build_app(deployment: Deployment, servings: Servings) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    max_depth = deployment.gateway.limits.max_json_depth

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # the framework's own refusals (unknown route, wrong method) in the same envelope as ours
        error = route_refusal(request.method, request.url.path, exc.status_code)
        if error is None:
            error = InvalidRequestError(str(exc.detail))
            error.status_code = exc.status_code
        return _error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(internal_error())

    def track_routes(track: str) -> None:
        max_body = deployment.max_body_bytes(track)

        async def chat_completions(request: Request):
            return await _respond(servings()[track], await read_request(request, max_body, max_depth), request)

        async def models():
            return JSONResponse(ModelList(data=[servings()[track].model_card()]).model_dump())

        for route in deployment.tracks[track].routes:
            app.add_api_route(f"{route}/chat/completions", chat_completions, methods=["POST"])
            app.add_api_route(f"{route}/models", models, methods=["GET"])

    any_model_max_body = deployment.max_body_bytes()

    async def any_model_chat_completions(request: Request):
        body = await read_request(request, any_model_max_body, max_depth)
        by_track = servings()
        if not body.model:
            return await _respond(by_track[deployment.default_track], body, request)
        serving = next((s for s in by_track.values() if body.model in s.model_names), None)
        if serving is None:
            served = ", ".join(repr(by_track[t].model_name) for t in deployment.served)
            raise NotFoundError(
                f"The model {body.model!r} does not exist; this endpoint serves {served}.", param="model"
            )
        return await _respond(serving, body, request)

    async def all_models():
        by_track = servings()
        return JSONResponse(ModelList(data=[by_track[t].model_card() for t in deployment.served]).model_dump())

    async def health():
        by_track = servings()
        states = await asyncio.gather(*(by_track[t].components_ready() for t in deployment.served))
        word = {True: "ok", False: "unavailable"}
        tracks = {t: word[all(components.values())] for t, components in zip(deployment.served, states)}
        components = {name: word[ok] for track_states in states for name, ok in track_states.items()}
        healthy = all(state == "ok" for state in tracks.values())
        body = {"status": word[healthy], "tracks": tracks, "components": components}
        return JSONResponse(body, status_code=200 if healthy else 503)

    # /v1 first: `bentoml build` labels the bento with the first chat-completions route (BentoCloud's playground)
    app.add_api_route("/v1/chat/completions", any_model_chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", all_models, methods=["GET"])
    for track in deployment.served:
        track_routes(track)
    app.add_api_route("/health", health, methods=["GET"])
    return app
