"""Shared fixtures: a tiny released-layout checkpoint and live servers on loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from parcae_serve.model.loading import builtin_checkpoint
from tests.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen


@contextlib.contextmanager
def running_server(
    model_dir: Path,
    *flags: str,
    timeout: float = 60,
    log: Path | None = None,
    threads: int | None = 1,
) -> Iterator[ServerProcess]:
    """`parcae-serve` in a subprocess on 127.0.0.1, yielded once /health is 200 (its stderr goes
    to `log` if given). Eager unless `flags` say otherwise (a later --compile wins), on `threads`
    kernel threads: one for tests, where another worker shares the cores; None: the server's
    own default, what a benchmark measures."""
    port = free_port()
    cmd = [sys.executable, "-m", "parcae_serve.server.api.cli", "--model", str(model_dir), "--port", str(port),
           "--log-level", "warning", "--kv-cache-bytes", str(64 * 2**20), "--compile", "off",
           *([] if threads is None else ["--threads", str(threads)]), *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stderr = open(log, "w") if log else None  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            assert time.monotonic() < deadline, "server did not become healthy"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield ServerProcess(url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if stderr:
            stderr.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-parcae"))


@pytest.fixture(scope="session")
def live_server(tiny_model_dir: Path) -> Iterator[str]:
    """A server on the tiny random model with the exact per-loop cache policy."""
    with running_server(tiny_model_dir, "--kv-policy", "per-loop", "--max-depth", "32") as server:
        yield server.url


@pytest.fixture(scope="session")
def builtin_server() -> Iterator[str]:
    """A server on the built-in trained model: realistic text (code, newlines, repeats)."""
    with running_server(builtin_checkpoint()) as server:
        yield server.url
