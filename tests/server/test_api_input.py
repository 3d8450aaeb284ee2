"""Bad input over real HTTP: any text, any size, any count gets an answer (4xx, never a 500)
without stalling other requests, /health or running streams."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_server
from tests.helpers import wall_clock

JSON = {"content-type": "application/json"}
MB = 2**20


def raw_post(url: str, path: str, body: bytes, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, headers={**JSON, **kw.pop("headers", {})},
                      timeout=60, **kw)  # fmt: skip


# Any text ---------------------------------------------------------------------------------------

LONE = b'"a\\ud800b"'  # a lone surrogate as a JSON escape
CESU = b'"a\xed\xa0\x80b"'  # the same surrogate as raw (CESU-8) bytes: invalid UTF-8
TEXT_PATHS = [
    ("/v1/completions", b'{"prompt": %s, "max_tokens": 2}', 200),
    ("/v1/completions", b'{"prompt": ["x", %s], "max_tokens": 2}', 200),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "stop": [%s]}', 200),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "user": %s}', 200),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, %s: 1}', 200),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "stream": true, "stop": %s}', 200),
    ("/v1/completions", b'{"prompt": "x", "model": %s}', 404),
    ("/v1/completions", b'{"prompt": "x", "kv_policy": %s}', 400),
    ("/v1/completions", b'{"prompt": "x", "recurrence_exit": {"criterion": %s, "threshold": 1}}', 400),
    ("/v1/completions", b'{"prompt": %s, "max_tokens": 1, "echo": true, "logprobs": 2}', 200),
    ("/tokenize", b'{"prompt": %s}', 200),
]  # fmt: skip


@pytest.mark.parametrize("text", [LONE, CESU], ids=["escape", "cesu8"])
@pytest.mark.parametrize(("path", "template", "status"), TEXT_PATHS)
def test_any_text_gets_an_answer(live_server: str, path, template, status, text) -> None:
    r = raw_post(live_server, path, template % text)
    assert r.status_code == status, r.text
    body = r.json() if "json" in r.headers["content-type"] else None
    if status != 200:
        assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_is_read_whatever_its_content_type(live_server: str, content_type) -> None:
    """`curl -d` sends form-encoded; some clients send text/plain. The body was validated as raw
    bytes ("Input should be a valid dictionary"); it is read as the JSON it is, and a body that
    is not JSON gets a 400 saying so."""
    headers = {} if content_type is None else {"content-type": content_type}
    body = b'{"prompt": "x", "max_tokens": 2, "ignore_eos": true}'
    r = httpx.post(f"{live_server}/v1/completions", content=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    r = httpx.post(f"{live_server}/v1/completions", content=b"prompt=x&max_tokens=2",
                   headers=headers, timeout=60)  # fmt: skip
    assert r.status_code == 400 and "invalid JSON body" in r.json()["error"]["message"], r.text


def test_unencodable_text_is_read_as_replacement_characters(live_server: str) -> None:
    def tokens(raw: bytes) -> list[int]:
        return raw_post(live_server, "/tokenize", b'{"prompt": %s}' % raw).json()["tokens"]

    assert tokens(LONE) == tokens('"a\ufffdb"'.encode())
    assert tokens(CESU) == tokens('"a\ufffd\ufffd\ufffdb"'.encode())  # one per invalid byte
    greedy = b'{"prompt": %s, "max_tokens": 6, "temperature": 0}'
    texts = [raw_post(live_server, "/v1/completions", greedy % p).json()["choices"][0]["text"]
             for p in (LONE, '"a\ufffdb"'.encode())]  # fmt: skip
    assert texts[0] == texts[1]
    r = raw_post(live_server, "/v1/completions", b'{"prompt": "x", "model": "m\\udfff"}')
    assert r.json()["error"]["message"] == "The model `m\ufffd` does not exist."


@pytest.mark.parametrize(
    "body",
    [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
     b"[" * 100_000, b'{"prompt": "x"', b"\xff\xfe", b'{"prompt": "x", "max_tokens": 1e400}'],
    ids=["nan", "infinity", "deep", "truncated", "not-utf8", "huge-number"],
)  # fmt: skip
def test_malformed_json_is_a_400(live_server: str, body: bytes) -> None:
    r = raw_post(live_server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator:
    with running_server(tiny_model_dir, "--max-batch", "4", "--max-queue", "12") as s:
        yield s


# Any count --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompts", "n", "param"), [(330, 1, "prompt"), (21, 16, "n")])
def test_request_that_can_never_fit_is_a_400_naming_the_limit(live_server, prompts, n, param):
    body = {"prompt": ["x = 1"] * prompts, "n": n, "max_tokens": 1}
    r = httpx.post(f"{live_server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert "320" in error["message"] and "--max-batch + --max-queue" in error["message"]


def test_the_largest_request_that_fits_is_served(server) -> None:
    url = f"{server.url}/v1/completions"
    assert httpx.post(url, json={"prompt": ["x"] * 17, "max_tokens": 1}).status_code == 400
    ok = httpx.post(url, json={"prompt": ["x"] * 4, "n": 4, "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"]) == 16


# Any size ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def watching(url: str, pid: int) -> Iterator[dict]:
    """While the block runs: the slowest /health answer and the server's RSS growth (MiB).

    `stall_bound_s` is what the slowest answer may take: 0.5 s (parsing a few MB of JSON on
    the event loop, as every ASGI framework does, takes tens of ms idle and several times that
    beside other test workers on 2 cores, where CI saw 0.51 s), or three times the slowest
    answer of a lead-in before the block where the machine is busier still, up to 1 s. What
    the tests guard against, tokenising or reading megabytes on the event loop, stalls it for
    seconds, so the bound still catches it.
    """
    seen = {"health_s": [], "rss_mib": []}
    done = threading.Event()

    def vm(field: str) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        raise AssertionError(field)

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            while not done.is_set():
                start = time.perf_counter()
                assert http.get("/health").status_code == 200
                seen["health_s"].append(time.perf_counter() - start)
                seen["rss_mib"].append(vm("VmRSS"))
                time.sleep(0.005)

    rss0, hwm0 = vm("VmRSS"), vm("VmHWM")
    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    lead_in = len(seen["health_s"])
    try:
        yield seen
    finally:
        time.sleep(0.1)
        done.set()
        poller.join()
    seen["stall_bound_s"] = max(0.5, min(1.0, 3 * max(seen["health_s"][:lead_in])))
    seen["slowest_health_s"] = max(seen["health_s"][lead_in:])
    seen["rss_growth_mib"] = max(max(seen["rss_mib"]) - rss0, vm("VmHWM") - hwm0)


def assert_health_never_stalled(seen: dict) -> None:
    slowest, bound = seen["slowest_health_s"], seen["stall_bound_s"]
    assert slowest < bound, (slowest, bound)


def ten_mb_chunks() -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(100):
        yield b"a" * 100_000
    yield b'"}'


@wall_clock
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_ten_mb_body_is_refused_unread_without_stalling(server, declared: bool) -> None:
    body = b"".join(ten_mb_chunks()) if declared else ten_mb_chunks()
    with watching(server.url, server.proc.pid) as seen:
        r = raw_post(server.url, "/v1/completions", body)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert_health_never_stalled(seen)
    assert seen["rss_growth_mib"] < 200, seen["rss_growth_mib"]


def test_the_server_ignores_sigpipe(server) -> None:
    """A write into a closed socket or a dead compile worker's pipe must be an error the
    server handles, not a signal that kills it (`python -m ...cli` once restored SIGPIPE's
    default, and a benchmark's server died of it while compiling)."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("SigIgn:")), 16)  # fmt: skip
    assert ignored & (1 << (signal.SIGPIPE - 1))


@wall_clock
def test_prompt_over_the_context_is_refused_before_tokenising(server) -> None:
    stream_gaps: list[float] = []

    def stream() -> None:
        body = {"prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            last = time.perf_counter()
            for _ in r.iter_lines():
                now = time.perf_counter()
                stream_gaps.append(now - last)
                last = now

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.3)
    bodies = [json.dumps({"prompt": p}).encode()  # ~5 MB each
              for p in ("def f():\n    pass\n" * 300_000, [7] * 600_000, [[7] * 600_000])]  # fmt: skip
    with watching(server.url, server.proc.pid) as seen:
        for body in bodies:
            start = time.perf_counter()
            r = raw_post(server.url, "/v1/completions", body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert time.perf_counter() - start < 4  # tokenising the first body takes ~9 s
    streamer.join()
    assert_health_never_stalled(seen)
    # a stream's token also waits on the GIL the JSON parse holds, and on a core shared with
    # another test worker: twice the calibrated health bound (CI runs on 2 loaded cores saw
    # gaps of 0.51 and 0.55 s), still far below a tokenising stall (the first body takes the
    # built-in tokenizer ~9 s)
    gap_bound = 2 * seen["stall_bound_s"]
    assert max(stream_gaps[1:]) < gap_bound, (stream_gaps, gap_bound)


@wall_clock
def test_tokenising_runs_off_the_event_loop(server) -> None:
    body = json.dumps({"prompt": " " * 3_000_000}).encode()  # seconds of BPE, few tokens
    with watching(server.url, server.proc.pid) as seen:
        start = time.perf_counter()
        r = raw_post(server.url, "/tokenize", body)
        took = time.perf_counter() - start
    assert r.status_code == 200 and r.json()["count"] > 300_000
    assert took > 2 * seen["stall_bound_s"], took  # long enough that a stall would show
    assert_health_never_stalled(seen)


def test_api_key_is_checked_before_the_body_is_read(tiny_model_dir) -> None:
    with running_server(tiny_model_dir, "--api-key", "s3cret") as s:
        key = {"authorization": "Bearer s3cret"}
        for body in (b"{not json", b"".join(ten_mb_chunks())):
            r = raw_post(s.url, "/v1/completions", body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert raw_post(s.url, "/v1/completions", b"{not json", headers=key).status_code == 400
        big = raw_post(s.url, "/v1/completions", b"".join(ten_mb_chunks()), headers=key)
        assert big.status_code == 413
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200
        assert httpx.get(f"{s.url}/metrics").status_code == 200
