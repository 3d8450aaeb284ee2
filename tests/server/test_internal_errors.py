"""An unexpected exception in a route: the OpenAI error body with status 500, on a connection
that stays open, through the server's own middleware stack, over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from parcae_serve.server.api.access_log import AccessLog
from parcae_serve.server.api.routes import InternalErrors, install_error_handlers
from tests.conftest import free_port
from tests.helpers import wait_for


@pytest.fixture(scope="module")
def crashing_server() -> Iterator[str]:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/crash")
    async def crash() -> dict:
        raise ValueError("a bug")

    @app.get("/fine")
    async def fine() -> dict:
        return {"ok": True}

    app.add_middleware(InternalErrors)  # as the server stacks them (app.build_app)
    app.add_middleware(AccessLog)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, "127.0.0.1", port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def exchange(sock: socket.socket, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET on an open connection: (status, headers, body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nX-Request-Id: trace-1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def test_a_crash_is_a_500_body_and_the_connection_serves_on(crashing_server: str) -> None:
    host, port = crashing_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        status, headers, body = exchange(sock, "/crash")
        assert status == 500
        assert json.loads(body)["error"] == {"message": "internal error: ValueError",
                                             "type": "internal_error", "param": None,
                                             "code": None}  # fmt: skip
        assert headers["x-request-id"] == "trace-1"  # answered inside the access log's wrapper
        assert headers.get("connection") != "close"
        assert exchange(sock, "/fine")[0] == 200  # the same connection, not reset
        assert exchange(sock, "/crash")[0] == 500


def test_a_crash_answers_in_json(crashing_server: str) -> None:
    r = httpx.get(f"{crashing_server}/crash", timeout=30)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
