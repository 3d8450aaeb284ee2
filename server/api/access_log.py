"""Request ids and the access log: the outermost layer, so it sees every request, 401 and 413
included.

Each request gets an id: the client's `X-Request-Id` if it is sane (letters, digits, `._:/+=-`, at most
128 characters; vLLM's header), else a fresh one. It is echoed as `X-Request-Id` on the response,
names the completion (`cmpl-<id>`, `chatcmpl-<id>`), and starts the request's log line, written
once the response has ended:

    req=<id> POST /v1/completions 200 prompt=12 cached=0 completion=16 depth=6.00 model=m 41.2ms
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from urllib.parse import quote

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("parcae.access")
MAX_ID_CHARS = 128
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the response
RECORD_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "mean_depth", "model")


SAFE_ID = re.compile(rf"[A-Za-z0-9._:/+=-]{{1,{MAX_ID_CHARS}}}")  # uuids, base64, trace ids


def request_id(given: str | None) -> str:
    """The client's id if it is safe to echo into headers, ids and logs (letters, digits and
    `._:/+=-`, at most 128: no space, so it cannot add a field to a log line), else a fresh
    one."""
    return given if given and SAFE_ID.fullmatch(given) else uuid.uuid4().hex


class AccessLog:
    """Pure ASGI middleware. The route fills `request.state.access` (a dict) with what the
    request cost; this writes it out with the status and the time taken."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        rid = request_id(Headers(scope=scope).get("x-request-id"))
        record: dict = {"request_id": rid}
        scope.setdefault("state", {})["access"] = record
        status = 0  # none sent yet

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_with_id)
            failed = False
        finally:
            if not status:  # nothing answered: the app failed, or the client left first
                status = 500 if failed else CLIENT_CLOSED
            self._write(scope, status, record, time.perf_counter() - started)
        return None

    @staticmethod
    def _write(scope: Scope, status: int, record: dict, seconds: float) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        # client text is quoted: a newline or a space in a path or model name cannot forge a line
        path = quote(scope["path"], safe="/@:._-~")
        parts = [f"req={record['request_id']}", scope["method"], path, str(status)]
        for key in RECORD_FIELDS:
            if key in record:
                value = record[key]
                name = key.removesuffix("_tokens").removeprefix("mean_")
                shown = (
                    f"{value:.2f}" if isinstance(value, float) else quote(str(value), safe="@:._-~")
                )
                parts.append(f"{name}={shown}")
        parts.append(f"{seconds * 1000:.1f}ms")
        log.info(" ".join(parts))
