"""Python client for parcae-serve: sync and async, typed results, retries on 429/503.

Example:
with ParcaeClient() as client:
    out = client.complete("def fib(n):", depth=8, exit=RecurrenceExit("kl", 1e-3))
    print(out.choices[0].text, out.usage.recurrence.mean_depth)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypedDict, Unpack

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_WAIT_S = 60.0  # a server asking for a longer pause is answered with its error instead
SSE_DONE = "[DONE]"

Prompt = str | list[str] | list[int] | list[list[int]]


class ParcaeAPIError(Exception):
    """An error response, with the fields of the server's OpenAI error body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(f"{status_code} {type or 'error'}: {message}")
        self.status_code, self.message, self.type = status_code, message, type
        self.param, self.code = param, code

    @classmethod
    def from_body(cls, status_code: int, body: Any) -> ParcaeAPIError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status_code, str(body))
        return cls(
            status_code,
            str(error.get("message", "")),
            error.get("type"),
            error.get("param"),
            error.get("code"),
        )

    @classmethod
    def from_response(cls, response: httpx.Response) -> ParcaeAPIError:
        try:
            body = response.json()
        except ValueError:  # not JSON: a proxy's page, say
            body = response.text or response.reason_phrase
        return cls.from_body(response.status_code, body)


@dataclass(frozen=True)
class RecurrenceExit:
    """Adaptive depth: stop a token's loops once `criterion` falls below `threshold` (kl,
    residual; learned: the checkpoint's exit probe, threshold a probability). `auto` takes no
    threshold: the server picks the fastest measured setting within `max_nll_cost` (0.01 = 1%)
    of the best measured NLL."""

    criterion: Literal["kl", "residual", "learned", "auto"]
    threshold: float | None = None
    min_depth: int = 1
    max_nll_cost: float | None = None


@dataclass(frozen=True)
class Speculation:
    """Self-speculative decoding: draft `tokens` tokens at `draft_depth` loops, verify them at
    the request's depth (same output as plain decoding)."""

    draft_depth: int
    tokens: int


@dataclass(frozen=True)
class SpeculativeUsage:
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float


@dataclass(frozen=True)
class RecurrenceUsage:
    mean_depth: float
    total_loops: int
    speculative: SpeculativeUsage | None = None  # when the request decoded speculatively

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RecurrenceUsage:
        spec = body.get("speculative")
        return cls(
            body["mean_depth"],
            body["total_loops"],
            None if spec is None else SpeculativeUsage(**spec),
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    recurrence: RecurrenceUsage

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Usage:
        return cls(
            body["prompt_tokens"],
            body["completion_tokens"],
            body["total_tokens"],
            RecurrenceUsage.from_json(body["recurrence"]),
        )


@dataclass(frozen=True)
class Logprobs:
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]
    depths: list[int | None]  # loops that produced each token

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Logprobs:
        return cls(
            body.get("tokens", []),
            body.get("token_logprobs", []),
            body.get("top_logprobs", []),
            body.get("text_offset", []),
            body.get("depths", []),
        )


@dataclass(frozen=True)
class Choice:
    text: str
    index: int
    finish_reason: str | None
    logprobs: Logprobs | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Choice:
        logprobs = Logprobs.from_json(body["logprobs"]) if body.get("logprobs") else None
        return cls(body["text"], body["index"], body.get("finish_reason"), logprobs)


@dataclass(frozen=True)
class Completion:
    """A whole completion, or one streamed chunk of it (a delta; usage only on the last)."""

    id: str
    model: str
    choices: list[Choice]
    usage: Usage | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Completion:
        choices = [Choice.from_json(c) for c in body["choices"]]
        usage = Usage.from_json(body["usage"]) if body.get("usage") else None
        return cls(body["id"], body["model"], choices, usage)


@dataclass(frozen=True)
class ModelCard:
    id: str
    max_model_len: int | None
    # a served model: mean_recurrence, default and max depth, layer counts, kv_policy, depth
    # table; a name that stands for settings (ID@T12, ID@PRESET): those settings
    recurrence: dict[str, Any]
    parent: str | None = None  # for ID@T12 and ID@PRESET: ID


class CompletionParams(TypedDict, total=False):
    """Keyword arguments of `complete` / `stream`. `depth`, `exit`, `warm_start` and
    `speculative` are the looping fields `recurrence_depth` / `recurrence_exit` /
    `recurrence_warm_start` / `recurrence_speculative`; any other key is sent as it is (vLLM
    extras)."""

    max_tokens: int
    depth: int
    exit: RecurrenceExit | Mapping[str, Any]
    warm_start: bool
    speculative: Speculation | Mapping[str, Any] | bool
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    stop: str | list[str]
    logprobs: int
    echo: bool
    n: int
    model: str
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    ignore_eos: bool
    min_tokens: int
    stop_token_ids: list[int]
    kv_policy: str
    user: str


RENAMED = {
    "depth": "recurrence_depth",
    "exit": "recurrence_exit",
    "warm_start": "recurrence_warm_start",
    "speculative": "recurrence_speculative",
}


def _fields_set(value: RecurrenceExit | Speculation) -> dict[str, Any]:
    return {k: v for k, v in asdict(value).items() if v is not None}


def completion_body(prompt: Prompt, params: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    """The JSON of POST /v1/completions; unset (None) parameters are left to the server."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": 16}
    for key, value in params.items():
        if value is not None:
            body[RENAMED.get(key, key)] = (
                _fields_set(value) if isinstance(value, RecurrenceExit | Speculation) else value
            )
    if stream:  # the last chunk then carries usage, with the loops the request ran
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def retry_after(header: str) -> float | None:
    """Seconds a Retry-After header asks for: a number, or an HTTP date."""
    try:
        return float(header)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(header).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def retry_wait(
    response: httpx.Response, attempt: int, max_retries: int, backoff: float
) -> float | None:
    """Seconds to wait before retrying `response`, or None when it is final: the server's
    Retry-After if it sent one, else exponential backoff."""
    if response.status_code not in RETRY_STATUSES or attempt >= max_retries:
        return None
    asked = retry_after(response.headers.get("retry-after", ""))
    wait = backoff * 2**attempt if asked is None else max(0.0, asked)
    return wait if wait <= MAX_RETRY_WAIT_S else None


def sse_payload(line: str) -> str | None:
    """The data of one server-sent-events line; None for blank lines and other fields."""
    return line[len("data:") :].strip() if line.startswith("data:") else None


def stream_chunk(payload: str) -> Completion:
    body = json.loads(payload)
    if "error" in body:  # failed after the 200 status went out: report it as the server error
        raise ParcaeAPIError.from_body(500, body)
    return Completion.from_json(body)


def model_cards(body: dict[str, Any]) -> list[ModelCard]:
    return [
        ModelCard(m["id"], m.get("max_model_len"), m.get("recurrence", {}), m.get("parent"))
        for m in body["data"]
    ]


def server_root(base_url: str) -> str:
    """The server's root URL: an OpenAI-style base URL (`http://host:8000/v1`, what the openai
    SDK is given) names the same server, and this client adds `/v1/...` itself."""
    return base_url.rstrip("/").removesuffix("/v1")


class _ClientBase:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 0.5,
    ) -> None:
        self.max_retries, self.backoff = max_retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._options: dict[str, Any] = {
            "base_url": server_root(base_url),
            "headers": headers,
            "timeout": timeout,
        }

    def _wait(self, response: httpx.Response, attempt: int) -> float | None:
        return retry_wait(response, attempt, self.max_retries, self.backoff)


class ParcaeClient(_ClientBase):
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.Client(transport=transport, **self._options)

    def __enter__(self) -> ParcaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(
        self, method: str, path: str, body: Any = None, stream: bool = False
    ) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.send(
                self._http.build_request(method, path, json=body), stream=stream
            )
            wait = self._wait(response, attempt)
            if wait is None:
                break
            response.close()
            time.sleep(wait)
            attempt += 1
        if response.is_error:
            response.read()
            response.close()
            raise ParcaeAPIError.from_response(response)
        return response

    def complete(self, prompt: Prompt, **params: Unpack[CompletionParams]) -> Completion:
        body = completion_body(prompt, params, stream=False)
        return Completion.from_json(self._send("POST", "/v1/completions", body).json())

    def stream(self, prompt: Prompt, **params: Unpack[CompletionParams]) -> Iterator[Completion]:
        body = completion_body(prompt, params, stream=True)
        response = self._send("POST", "/v1/completions", body, stream=True)
        try:
            for line in response.iter_lines():
                payload = sse_payload(line)
                if payload == SSE_DONE:
                    return
                if payload:
                    yield stream_chunk(payload)
        finally:
            response.close()

    def models(self) -> list[ModelCard]:
        return model_cards(self._send("GET", "/v1/models").json())

    def health(self) -> str:
        """Readiness: "ok", else "loading", "draining" or "failed" (a 503 here is no error)."""
        response = self._http.get("/health")
        if response.status_code not in (200, 503):
            raise ParcaeAPIError.from_response(response)
        return response.json()["status"]

    def tokenize(self, text: str) -> list[int]:
        return self._send("POST", "/tokenize", {"prompt": text}).json()["tokens"]

    def detokenize(self, tokens: list[int]) -> str:
        return self._send("POST", "/detokenize", {"tokens": tokens}).json()["prompt"]


class AsyncParcaeClient(_ClientBase):
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        self._http = httpx.AsyncClient(transport=transport, **self._options)

    async def __aenter__(self) -> AsyncParcaeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(
        self, method: str, path: str, body: Any = None, stream: bool = False
    ) -> httpx.Response:
        attempt = 0
        while True:
            request = self._http.build_request(method, path, json=body)
            response = await self._http.send(request, stream=stream)
            wait = self._wait(response, attempt)
            if wait is None:
                break
            await response.aclose()
            await asyncio.sleep(wait)
            attempt += 1
        if response.is_error:
            await response.aread()
            await response.aclose()
            raise ParcaeAPIError.from_response(response)
        return response

    async def complete(self, prompt: Prompt, **params: Unpack[CompletionParams]) -> Completion:
        body = completion_body(prompt, params, stream=False)
        response = await self._send("POST", "/v1/completions", body)
        return Completion.from_json(response.json())

    async def stream(
        self, prompt: Prompt, **params: Unpack[CompletionParams]
    ) -> AsyncIterator[Completion]:
        body = completion_body(prompt, params, stream=True)
        response = await self._send("POST", "/v1/completions", body, stream=True)
        try:
            async for line in response.aiter_lines():
                payload = sse_payload(line)
                if payload == SSE_DONE:
                    return
                if payload:
                    yield stream_chunk(payload)
        finally:
            await response.aclose()

    async def models(self) -> list[ModelCard]:
        return model_cards((await self._send("GET", "/v1/models")).json())

    async def health(self) -> str:
        """Readiness: "ok", else "loading", "draining" or "failed" (a 503 here is no error)."""
        response = await self._http.get("/health")
        if response.status_code not in (200, 503):
            raise ParcaeAPIError.from_response(response)
        return response.json()["status"]

    async def tokenize(self, text: str) -> list[int]:
        return (await self._send("POST", "/tokenize", {"prompt": text})).json()["tokens"]

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self._send("POST", "/detokenize", {"tokens": tokens})).json()["prompt"]
