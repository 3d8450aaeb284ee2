"""The Python client and the `parcae` CLI: against a live server on the tiny model, and against
`httpx.MockTransport` for what a healthy server never does (429/503, mid-stream errors)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from parcae_serve.clients import cli
from parcae_serve.clients.client import (
    AsyncParcaeClient,
    Completion,
    ParcaeAPIError,
    ParcaeClient,
    RecurrenceExit,
    Speculation,
    SpeculativeUsage,
    completion_body,
)

PROMPT = "import os\n"
TOO_DEEP = 10_000  # above any server's --max-depth


@pytest.fixture
def client(live_server: str) -> Iterator[ParcaeClient]:
    with ParcaeClient(live_server, timeout=60) as c:
        yield c


# Live server ----------------------------------------------------------------------------------
def test_complete_returns_typed_completion_with_recurrence_usage(client: ParcaeClient) -> None:
    out = client.complete(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
    assert isinstance(out, Completion) and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert out.usage.recurrence.total_loops > 0


def test_fixed_depth_is_sent_and_reported(client: ParcaeClient) -> None:
    for depth in (1, 7):
        out = client.complete(PROMPT, max_tokens=3, depth=depth, seed=0)
        assert out.usage is not None and out.usage.recurrence.mean_depth == depth


def test_exit_rule_is_sent_as_dataclass_or_dict(client: ParcaeClient) -> None:
    # a threshold nothing stays above: every token exits at min_depth, below the depth of 9
    rules = [
        RecurrenceExit("residual", 1e9, min_depth=2),
        {"criterion": "kl", "threshold": 1e9, "min_depth": 3},
    ]
    for rule, expected in zip(rules, (2.0, 3.0), strict=True):
        out = client.complete(PROMPT, max_tokens=4, depth=9, exit=rule, ignore_eos=True)
        assert out.usage is not None and out.usage.recurrence.mean_depth == expected


def test_async_complete_and_stream(live_server: str) -> None:
    async def run() -> tuple[Completion, list[Completion]]:
        async with AsyncParcaeClient(live_server, timeout=60) as client:
            out = await client.complete(PROMPT, max_tokens=4, depth=2, ignore_eos=True)
            chunks = [c async for c in client.stream(PROMPT, max_tokens=4, ignore_eos=True)]
        return out, chunks

    out, chunks = asyncio.run(run())
    assert out.usage is not None and out.usage.completion_tokens == 4
    assert out.usage.recurrence.mean_depth == 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_stream_yields_text_and_ends_with_usage(client: ParcaeClient) -> None:
    chunks = list(client.stream(PROMPT, max_tokens=6, depth=3, ignore_eos=True))
    deltas = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in deltas)
    assert deltas[-1].choices[0].finish_reason == "length"
    usage = chunks[-1].usage  # the iterator stopped at [DONE], after the usage chunk
    assert usage is not None and usage.completion_tokens == 6
    assert usage.recurrence.mean_depth == 3


def test_bad_request_raises_api_error_with_server_message(
    client: ParcaeClient, live_server: str
) -> None:
    body = {"prompt": PROMPT, "recurrence_depth": TOO_DEEP}
    raw = httpx.post(f"{live_server}/v1/completions", json=body, timeout=60).json()["error"]
    for call in (
        lambda: client.complete(PROMPT, depth=TOO_DEEP),
        lambda: list(client.stream(PROMPT, depth=TOO_DEEP)),
    ):
        with pytest.raises(ParcaeAPIError) as err:
            call()
        assert err.value.status_code == 400
        assert err.value.message == raw["message"]
        assert (err.value.type, err.value.param) == (raw["type"], raw["param"])


def test_models_health_and_tokens(client: ParcaeClient) -> None:
    cards = client.models()
    assert cards[0].parent is None and "mean_recurrence" in cards[0].recurrence
    depth_names = {c.id: c.recurrence for c in cards if c.parent == cards[0].id}
    assert depth_names[f"{cards[0].id}@T2"] == {"recurrence_depth": 2}
    assert client.health() == "ok"
    tokens = client.tokenize(PROMPT)
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert PROMPT in client.detokenize(tokens)


def test_cli_complete_prints_the_completion(
    client: ParcaeClient, live_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # seeded: the recurrent state starts from noise, so even greedy decoding needs the seed
    args = ["--url", live_server, "--depth", "2", "--max-tokens", "4", "--seed", "5"]
    expected = client.complete(PROMPT, max_tokens=4, depth=2, seed=5).choices[0].text
    for stream in ([], ["--stream"]):
        assert cli.main(["complete", PROMPT, *args, *stream]) == 0
        out = capsys.readouterr()
        assert out.out == expected + "\n"
        assert re.search(r"\[\d+ tokens, mean depth 2, \d+ loops\]", out.err)


def test_cli_reports_server_errors(live_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["complete", PROMPT, "--url", live_server, "--depth", str(TOO_DEEP)]) == 1
    assert "recurrence_depth" in capsys.readouterr().err


def test_cli_prints_the_builtin_model_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "--path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def test_cli_takes_the_url_from_the_environment(
    live_server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PARCAE_URL", live_server)
    assert cli.main(["health"]) == 0
    assert capsys.readouterr().out == "ok\n"


def test_cli_takes_an_openai_style_base_url(
    live_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`.../v1` is what the openai SDK is given; it names the same server."""
    for url in (f"{live_server}/v1", f"{live_server}/v1/", f"{live_server}/"):
        assert cli.main(["health", "--url", url]) == 0
        assert capsys.readouterr().out == "ok\n"


@pytest.mark.parametrize(
    "flags", [["--concurrency", "0"], ["--concurrency", "-1"], ["--requests", "0"],
              ["--concurrency", "x"], ["--max-tokens", "-1"]],
)  # fmt: skip
def test_cli_bench_refuses_counts_it_cannot_run(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A concurrency of 0 waited forever on its semaphore; -1 crashed with a traceback."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--url", "http://127.0.0.1:9", *flags])
    assert exit_.value.code == 2 and flags[0] in capsys.readouterr().err


def test_cli_bench_prints_throughput_and_latency(
    live_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "4", "--concurrency", "2", "--depths", "1,3", "--max-tokens", "3"]
    assert cli.main(["bench", "--url", live_server, *args]) == 0
    out = capsys.readouterr()
    assert "12 tokens" in out.out and "tokens/s, 0 failed" in out.out
    rows = [line.split()[0] for line in out.out.splitlines()[3:]]
    assert rows == ["1", "3", "all"]
    assert "4/4" in out.err  # the progress bar reached the end


# Mock transport -------------------------------------------------------------------------------
COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "model": "tiny",
    "choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "length"}],
    "usage": {
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "total_tokens": 3,
        "recurrence": {"mean_depth": 4.0, "total_loops": 8},
    },
}
QUEUE_FULL = {
    "error": {
        "message": "too many requests waiting; retry later",
        "type": "rate_limit_exceeded",
        "param": None,
        "code": None,
    }
}


def mock_server(replies: list[httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    """Answers with `replies` in order (the last one repeats), recording each request."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        reply = replies[min(len(seen), len(replies)) - 1]
        # a fresh response each time: httpx binds a response to the request it answers
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    return httpx.MockTransport(handle)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses the clients take between attempts, recorded instead of slept."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr("parcae_serve.clients.client.time.sleep", recorded.append)
    monkeypatch.setattr("parcae_serve.clients.client.asyncio.sleep", async_sleep)
    return recorded


def test_retries_429_and_503_honouring_retry_after(waits: list[float]) -> None:
    replies = [
        httpx.Response(429, headers={"Retry-After": "2"}, json=QUEUE_FULL),
        httpx.Response(503, headers={"Retry-After": "0.5"}, json=QUEUE_FULL),
        httpx.Response(200, json=COMPLETION),
    ]
    seen: list[httpx.Request] = []
    transport = mock_server(replies, seen)
    with ParcaeClient("http://parcae.test", api_key="k", transport=transport) as client:
        out = client.complete("x", depth=4, exit=RecurrenceExit("kl", 1e-3))
    assert out.choices[0].text == "ok" and out.usage is not None
    assert out.usage.recurrence.mean_depth == 4.0
    assert waits == [2.0, 0.5] and len(seen) == 3
    body = json.loads(seen[0].content)
    assert body["recurrence_depth"] == 4 and "depth" not in body and "exit" not in body
    assert body["recurrence_exit"] == {"criterion": "kl", "threshold": 1e-3, "min_depth": 1}
    assert seen[0].headers["authorization"] == "Bearer k"


def test_async_retries_honour_retry_after(waits: list[float]) -> None:
    replies = [
        httpx.Response(503, headers={"Retry-After": "3"}, json=QUEUE_FULL),
        httpx.Response(200, json=COMPLETION),
    ]
    seen: list[httpx.Request] = []

    async def run() -> Completion:
        transport = mock_server(replies, seen)
        async with AsyncParcaeClient("http://parcae.test", transport=transport) as client:
            return await client.complete("x")

    assert asyncio.run(run()).choices[0].text == "ok"
    assert waits == [3.0] and len(seen) == 2


@pytest.mark.parametrize(
    ("headers", "expected_waits"),
    [({}, [0.5, 1.0, 2.0]), ({"Retry-After": "3600"}, [])],  # backoff; a pause too long to wait
)
def test_retries_are_bounded_then_raise_the_last_error(
    waits: list[float], headers: dict[str, str], expected_waits: list[float]
) -> None:
    seen: list[httpx.Request] = []
    transport = mock_server([httpx.Response(429, headers=headers, json=QUEUE_FULL)], seen)
    client = ParcaeClient("http://parcae.test", transport=transport, max_retries=3)
    with client, pytest.raises(ParcaeAPIError) as err:
        client.complete("x")
    assert err.value.status_code == 429 and err.value.type == "rate_limit_exceeded"
    assert err.value.message == QUEUE_FULL["error"]["message"]
    assert waits == expected_waits and len(seen) == len(expected_waits) + 1


def sse(*events: dict | str) -> bytes:
    return "".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events
    ).encode()


def test_stream_stops_at_done_and_raises_mid_stream_errors() -> None:
    chunk = {**COMPLETION, "usage": None}
    failure = {
        "error": {"message": "engine failed", "type": "internal_error", "param": None, "code": None}
    }
    bodies = [sse(chunk, "[DONE]", chunk), sse(chunk, failure)]
    replies = [
        httpx.Response(200, content=b, headers={"content-type": "text/event-stream"})
        for b in bodies
    ]
    with ParcaeClient("http://parcae.test", transport=mock_server(replies, [])) as client:
        assert [c.choices[0].text for c in client.stream("x")] == ["ok"]
        with pytest.raises(ParcaeAPIError, match="engine failed") as err:
            list(client.stream("x"))
    assert err.value.type == "internal_error"


def test_speculation_is_sent_and_its_usage_read() -> None:
    spec_usage = {"draft_tokens": 8, "accepted_tokens": 6, "acceptance_rate": 0.75}
    reply = json.loads(json.dumps(COMPLETION))
    reply["usage"]["recurrence"]["speculative"] = spec_usage
    seen: list[httpx.Request] = []
    transport = mock_server([httpx.Response(200, json=reply)] * 2, seen)
    with ParcaeClient("http://parcae.test", transport=transport) as client:
        out = client.complete("x", depth=4, speculative=Speculation(1, 4))
        plain = client.complete("x", speculative=False)
    assert out.usage.recurrence.speculative == SpeculativeUsage(8, 6, 0.75)
    assert json.loads(seen[0].content)["recurrence_speculative"] == {"draft_depth": 1, "tokens": 4}
    assert json.loads(seen[1].content)["recurrence_speculative"] is False
    assert plain.usage.recurrence.mean_depth == 4.0
    assert cli.speculation("2:6") == Speculation(2, 6)
    for bad in ("2", "a:b", "1:-2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.speculation(bad)


def test_cli_exit_rule_syntax() -> None:
    assert cli.exit_rule("kl:0.001") == RecurrenceExit("kl", 0.001, 1)
    assert cli.exit_rule("residual:0.03:2") == RecurrenceExit("residual", 0.03, 2)
    assert cli.exit_rule("learned:0.9") == RecurrenceExit("learned", 0.9, 1)
    assert cli.exit_rule("auto:0.01") == RecurrenceExit("auto", None, 1, max_nll_cost=0.01)
    body = completion_body("x", {"exit": cli.exit_rule("auto:0.01")}, stream=False)
    assert body["recurrence_exit"] == {"criterion": "auto", "min_depth": 1, "max_nll_cost": 0.01}
    for bad in ("kl", "cosine:0.1", "kl:x", "kl:0.1:2:3", "auto:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.exit_rule(bad)


def test_cli_calibrate_measures_and_writes_the_curve(
    tiny_model_dir, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration.json"
    argv = ["calibrate", "--model", str(tiny_model_dir), "--out", str(out), "--sequences", "2",
            "--length", "12"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["loss_by_depth"]) >= {"1", "2", "3", "6", "12"}  # mu_rec = 3: up to 4*mu
    assert {r["criterion"] for r in report["adaptive"]} == {"kl", "residual", "learned"}
    assert (tmp_path / "exit_probe.safetensors").exists()  # beside --out, not in the checkpoint
    assert not (tiny_model_dir / "exit_probe.safetensors").exists()
    assert {"L_inf", "Z", "z"} <= set(report["fit"])
    assert json.loads(capsys.readouterr().out)["loss_by_depth"] == report["loss_by_depth"]
