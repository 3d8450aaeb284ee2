"""HTTP only: parse, call the completion service, render results and errors. The API key and the
body-size cap are checked before any of this (gate.py); the published OpenAPI declares every
response a route can give."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parcae_serve.server.api.completions import APIError, model_not_found
from parcae_serve.server.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    Version,
)
from parcae_serve.server.api.state import ServerState
from parcae_serve.server.api.text import encode_texts, parse_client_json
from parcae_serve.server.engine.scheduler import QueueFull

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's union-member locs


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    reasons = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
               413: "request body over --max-request-bytes", 429: "queue full (Retry-After)",
               503: "loading or draining (Retry-After)"}  # fmt: skip
    out: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": reasons[code]} for code in codes
    }
    out["default"] = {"model": ErrorResponse, "description": "any other error"}
    return out


class ClientTextRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_client_json(await self.body())
        return self._json


class ClientTextRoute(APIRoute):
    """Routes whose body is parsed by `parse_client_json`: any bytes, any text, and under any
    Content-Type. FastAPI reads a body as JSON only when the header says JSON, and validated a
    `text/plain` or form-encoded one (`curl -d` sends that) as raw bytes: "Input should be a
    valid dictionary", which does not point at the header. These routes take nothing but JSON,
    so a body is JSON or a 400 that says where it fails to parse."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def parse_as_client_text(request: Request) -> Response:
            return await handler(ClientTextRequest(as_json(request.scope), request.receive))

        return parse_as_client_text


def as_json(scope: Scope) -> Scope:
    """`scope` with its Content-Type set to JSON (the other headers kept)."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


router = APIRouter(route_class=ClientTextRoute)


def state_of(request: Request) -> ServerState:
    return request.app.state.parcae


def error_response(err: APIError) -> JSONResponse:
    body = {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }
    return JSONResponse(body, status_code=err.status, headers=err.headers)


class InternalErrors:
    """Pure ASGI middleware, innermost: an unexpected exception becomes a 500 with the OpenAI
    error body, sent as any response is. Starlette's own catch-all answers from outside every
    middleware and then re-raises: uvicorn dropped the connection (a client's next keep-alive
    request was reset) and the response went out without its X-Request-Id. A response already
    started cannot be replaced: that exception goes on up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            if started:
                raise
            log.exception("internal error in %s %s", scope["method"], scope["path"])
            await internal_error(err)(scope, receive, send)
        return None


def internal_error(err: Exception) -> JSONResponse:
    return error_response(APIError(500, f"internal error: {type(err).__name__}", "internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # union members appear in the location as their type (str, SpeculativeSpec): not fields
        param = ".".join(p for p in loc if p.isidentifier() and p not in UNION_TAGS
                         and not p[0].isupper()) or None  # fmt: skip
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = f"invalid JSON body: {first.get('ctx', {}).get('error', '')}", None
        elif param:
            message = f"{param}: {message}"
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), kind, headers=err.headers))

    @app.exception_handler(Exception)  # outside the middleware: InternalErrors answers first
    async def crashed(_: Request, err: Exception) -> JSONResponse:
        return internal_error(err)


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


SSE_EVENT = {  # one server-sent event (OpenAPI 3.1: the schema of each event)
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "a completion chunk (a CompletionResponse with one choice delta, or "
            "`choices: []` and the usage), or `[DONE]` last",
        },
        "event": {"type": "string"},
    },
}
COMPLETION_OK = {
    "model": CompletionResponse,
    "description": "the completion; with `stream: true`, server-sent events ending `data: [DONE]`",
    "content": {"text/event-stream": {"schema": SSE_EVENT}},
}


@router.post(
    "/v1/completions", response_model=None,
    responses={200: COMPLETION_OK, **_errors(400, 401, 404, 413, 429, 503)},
)  # fmt: skip
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await generate(request, serving(request).service, body)


CHAT_OK = {
    "model": ChatCompletionResponse,
    "description": "the chat completion; with `stream: true`, server-sent events of "
    "`chat.completion.chunk` objects ending `data: [DONE]`",
    "content": {"text/event-stream": {"schema": SSE_EVENT}},
}


@router.post(
    "/v1/chat/completions", response_model=None,
    responses={200: CHAT_OK, **_errors(400, 401, 404, 413, 429, 503)},
)  # fmt: skip
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await generate(request, serving(request).chat, body)


async def generate(request: Request, service, body) -> Response:
    """A completions or chat request through its service: SSE when streamed, else the whole
    response (its sequences freed if the client goes away)."""
    record = access_record(request, body.model)
    try:
        if body.stream:
            events = await service.stream(body, record)
            return StreamingResponse(events, media_type="text/event-stream")
        return await _until_disconnect(request, service.complete(body, record))
    except QueueFull:
        raise queue_full() from None


def access_record(request: Request, model: str | None) -> dict | None:
    """The access-log record of this request (filled in as the request runs)."""
    record = getattr(request.state, "access", None)
    if record is not None:
        record["model"] = model or state_of(request).service.limits.model_name
    return record


async def _until_disconnect(request: Request, work) -> Response:
    """Run `work`, cancelling it (and so freeing its sequences) if the client goes away."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
    return JSONResponse(task.result().model_dump(mode="json"))


@router.get("/v1/models", responses=_errors(401, 503))
async def models(request: Request) -> ModelList:
    """Every name a request may send: the aliases (with the architecture, KV policy and the
    measured compute-quality table), then `ID@PRESET` and `ID@T<n>` with the settings each
    stands for."""
    return ModelList(data=_model_cards(serving(request)))


@router.get("/v1/models/{model_id:path}", responses=_errors(401, 404, 503))
async def model(request: Request, model_id: str) -> ModelCard:
    """Any name a request may use (OpenAI's retrieve): those `/v1/models` lists, and any other
    `ID@T<n>` up to --max-depth or alias@preset; 404 model_not_found else."""
    state = serving(request)
    entry = state.service.limits.models.describe(model_id)
    if entry is None:
        raise model_not_found(model_id)
    return _model_cards(state, [entry])[0]


def _model_cards(state: ServerState, entries: list | None = None) -> list[ModelCard]:
    """Cards of `entries` (id, parent, settings), by default every name /v1/models lists."""
    cfg, limits = state.engine.model.cfg, state.service.limits
    served = {
        "mean_recurrence": cfg.mean_recurrence,
        "default_depth": limits.default_depth,
        "max_depth": limits.max_depth,
        "prelude": cfg.n_layers_in_prelude,
        "recurrent": cfg.n_layers_in_recurrent_block,
        "coda": cfg.n_layers_in_coda,
        "kv_policy": str(state.engine.cache.policy),
        "presets": {name: p.given() for name, p in limits.models.presets.items()},
        **(state.model_card.get("depth_table") or {}),
    }
    created = int(time.time())
    return [
        ModelCard(id=name, created=created, owned_by="parcae-serve", root=limits.model_name,
                  parent=parent, max_model_len=limits.max_context,
                  recurrence=served if parent is None else settings)
        for name, parent, settings in (limits.models.listed() if entries is None else entries)
    ]  # fmt: skip


@router.get(
    "/health",
    response_model_exclude_none=True,
    responses={503: {"model": Health, "description": "loading or draining"}},
)
async def health(request: Request) -> Health:
    state = state_of(request)
    if state.ready and not state.draining:
        return Health(status="ok")
    status = "draining" if state.draining else ("failed" if state.load_error else "loading")
    body = Health(status=status, detail=state.load_error)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503)


class PrometheusText(PlainTextResponse):
    media_type = CONTENT_TYPE_LATEST


@router.get("/metrics", response_class=PrometheusText)
async def metrics(request: Request) -> PrometheusText:
    return PrometheusText(state_of(request).metrics.render())


@router.post("/tokenize", responses=_errors(400, 401, 413, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = serving(request)
    encoded = await asyncio.to_thread(
        encode_texts, state.tokenizer, [body.prompt], body.add_special_tokens
    )
    tokens = encoded[0]
    return TokenizeResponse(
        tokens=tokens, count=len(tokens), max_model_len=state.service.limits.max_context
    )


@router.get("/tokenizer_info", responses=_errors(503))
async def tokenizer_info(request: Request) -> TokenizerInfo:
    state = serving(request)
    tok = state.tokenizer
    return TokenizerInfo(
        bos_token=tok.special_text(tok.bos_id),
        eos_token=tok.special_text(tok.eos_id),
        pad_token=tok.special_text(tok.pad_id),
        add_bos_token=tok.bos_id is not None,
        model_max_length=state.service.limits.max_context,
        vocab_size=state.service.limits.vocab_size,
        chat_template=state.chat.template.source,
    )


@router.post("/detokenize", responses=_errors(400, 401, 413, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = serving(request)
    vocab = state.service.limits.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(state.tokenizer.decode, body.tokens))


@router.get("/version")
async def server_version() -> Version:
    try:
        return Version(version=version("parcae-serve"))
    except PackageNotFoundError:
        return Version(version="unknown")
