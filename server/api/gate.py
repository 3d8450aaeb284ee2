"""What every request passes before any parsing: the API key, then the body-size cap."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parcae_serve.server.api.completions import APIError
from parcae_serve.server.api.routes import error_response

GUARDED_PREFIX = "/v1/"  # as vLLM: the key guards the OpenAI API; probes, metrics and the
# tokenizer endpoints stay open (lm-eval's remote tokenizer calls them without a key)


class RequestGate:
    """A pure ASGI middleware. A request without the key gets 401 before its body is read; a
    body over `max_body` gets 413, refused on its declared length or as soon as the bytes read
    exceed the cap, so neither a big body nor its JSON ever reaches memory or the event loop."""

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.accepted = [f"Bearer {key}".encode() for key in api_keys]

    def authorized(self, header: str | None) -> bool:
        """Whether the Authorization header carries one of the keys. Each key is compared in
        constant time and all are compared, so timing tells neither a key nor which matched."""
        given = (header or "").encode()
        return sum(hmac.compare_digest(given, key) for key in self.accepted) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if (
            self.accepted
            and (scope["path"] + "/").startswith(GUARDED_PREFIX)
            and scope["method"] != "OPTIONS"  # a CORS preflight carries no credentials
            and not self.authorized(headers.get("authorization"))
        ):
            return await self._refuse(scope, receive, send, APIError(401, "invalid or missing API key",
                                      "authentication_error", code="invalid_api_key"))  # fmt: skip
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._refuse(scope, receive, send, self._too_large())
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await self._refuse(scope, receive, send, self._too_large())
            more = message.get("more_body", False)
        await self.app(scope, _replay(bytes(body), receive), send)
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is larger than {self.max_body} bytes "
                        "(--max-request-bytes)", code="request_too_large")  # fmt: skip

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: APIError) -> None:
        response = error_response(err)
        response.headers["connection"] = "close"  # the rest of the body is never read
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, read once here, handed to the app; then the real channel (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
