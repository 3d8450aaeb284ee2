"""HTTP only: parse, authorise, call the completion service, render results and errors."""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from parcae_serve.server.api.completions import APIError
from parcae_serve.server.api.protocol import CompletionRequest, DetokenizeRequest, TokenizeRequest
from parcae_serve.server.api.state import ServerState
from parcae_serve.server.engine.scheduler import QueueFull

router = APIRouter()
DISCONNECT_POLL_S = 0.2
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's union-member locs


def state_of(request: Request) -> ServerState:
    return request.app.state.parcae


def error_response(err: APIError) -> JSONResponse:
    body = {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(p for p in loc if p.isidentifier() and p not in UNION_TAGS) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = f"invalid JSON body: {first.get('ctx', {}).get('error', '')}", None
        elif param:
            message = f"{param}: {message}"
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), kind))

    @app.exception_handler(Exception)
    async def crashed(_: Request, err: Exception) -> JSONResponse:
        return error_response(
            APIError(500, f"internal error: {type(err).__name__}", "internal_error")
        )


def authorised(request: Request) -> None:
    key = state_of(request).settings.api_key
    if key and request.headers.get("authorization") != f"Bearer {key}":
        raise APIError(401, "invalid or missing API key", "authentication_error",
                       code="invalid_api_key")  # fmt: skip


def serving(request: Request) -> ServerState:
    """The state, if it can take new work: 503 while loading or draining."""
    state = state_of(request)
    if state.draining:
        raise APIError(503, "server is shutting down", "service_unavailable",
                       headers={"Retry-After": "5"})  # fmt: skip
    if not state.ready:
        reason = state.load_error or "model is loading"
        raise APIError(503, reason, "service_unavailable", headers={"Retry-After": "5"})
    return state


def queue_full() -> APIError:
    return APIError(429, "too many requests waiting; retry later", "rate_limit_exceeded",
                    headers={"Retry-After": "1"})  # fmt: skip


@router.post("/v1/completions", dependencies=[Depends(authorised)])
async def completions(body: CompletionRequest, request: Request):
    state = serving(request)
    service = state.service
    try:
        if body.stream:
            events = await service.stream(body)
            return StreamingResponse(events, media_type="text/event-stream")
        return await _until_disconnect(request, service.complete(body))
    except QueueFull:
        raise queue_full() from None


async def _until_disconnect(request: Request, work):
    """Run `work`, cancelling it (and so freeing its sequences) if the client goes away."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
    return task.result()


@router.get("/v1/models", dependencies=[Depends(authorised)])
async def models(request: Request) -> dict:
    state = serving(request)
    cfg, limits = state.engine.model.cfg, state.service.limits
    recurrence = {
        "mean_recurrence": cfg.mean_recurrence,
        "max_depth": limits.max_depth,
        "prelude": cfg.n_layers_in_prelude,
        "recurrent": cfg.n_layers_in_recurrent_block,
        "coda": cfg.n_layers_in_coda,
        "kv_policy": str(state.engine.cache.policy),
    }
    table = state.model_card.get("depth_table")
    if table:
        recurrence.update(table)
    card = {
        "id": limits.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "parcae-serve",
        "max_model_len": limits.max_context,
        "recurrence": recurrence,
    }
    return {"object": "list", "data": [card]}


@router.get("/health")
async def health(request: Request) -> Response:
    state = state_of(request)
    if state.ready and not state.draining:
        return JSONResponse({"status": "ok"})
    status = "draining" if state.draining else ("failed" if state.load_error else "loading")
    return JSONResponse({"status": status, "detail": state.load_error}, status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", dependencies=[Depends(authorised)])
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = serving(request)
    tokens = state.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
    return {
        "tokens": tokens,
        "count": len(tokens),
        "max_model_len": state.service.limits.max_context,
    }


@router.post("/detokenize", dependencies=[Depends(authorised)])
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = serving(request)
    vocab = state.service.limits.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return {"prompt": state.tokenizer.decode(body.tokens)}


@router.get("/version")
async def server_version() -> dict:
    try:
        return {"version": version("parcae-serve")}
    except PackageNotFoundError:
        return {"version": "unknown"}
