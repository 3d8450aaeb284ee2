"""The published /openapi.json tells the truth: a schema fuzzer run against it (not a corrected
copy) finds no 5xx and no response that breaks the schema; errors are declared as sent."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import running_server

# What must hold for every generated request; positive/negative data acceptance are left out on
# purpose: a schema-valid body can still be refused (unknown model, depth over --max-depth).
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,unsupported_method")  # fmt: skip


@pytest.fixture(scope="module")
def url(tiny_model_dir) -> Iterator[str]:
    # small limits keep each of the ~1,400 fuzzed requests short (at most 16 sequences of 32
    # tokens, depth 3, the tiny model's default): the server's decode is most of the run's time
    flags = ["--max-context", "32", "--max-depth", "3", "--max-batch", "4", "--max-queue", "12"]
    with running_server(tiny_model_dir, *flags) as server:
        yield server.url


def test_schema_fuzzer_finds_no_server_error_and_no_schema_violation(url: str, tmp_path) -> None:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
           "--checks", CHECKS, "--max-examples", "40", "--seed", "14",
           "--generation-deterministic", "--workers", "1", "--request-timeout", "30",
           "--no-color"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]


def test_openapi_declares_the_responses_actually_sent(url: str) -> None:
    spec = httpx.get(f"{url}/openapi.json").json()
    completions = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(completions)
    assert "422" not in completions and "HTTPValidationError" not in spec["components"]["schemas"]
    error = completions["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "text/event-stream" in completions["200"]["content"]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == [httpx.get(f"{url}/metrics").headers["content-type"]]
    assert next(iter(metrics)).startswith("text/plain")
    assert "503" in spec["paths"]["/health"]["get"]["responses"]


def test_wrong_method_is_a_405_with_allow(url: str) -> None:
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"]
    r = httpx.delete(f"{url}/health")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
