"""The server over real HTTP on a loopback port: the official openai SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx
import openai
import pytest

from tests.conftest import running_server
from tests.helpers import metric, wait_for

PROMPT = "def parse(text):\n    "


@pytest.fixture(scope="module")
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def greedy(client: openai.OpenAI, depth: int, **kw):
    return client.completions.create(
        model=model_id(client), prompt=PROMPT, max_tokens=kw.pop("max_tokens", 12),
        temperature=0, seed=kw.pop("seed", 3), extra_body={"recurrence_depth": depth}, **kw,
    )  # fmt: skip


# Completions ----------------------------------------------------------------------------------


def test_openai_sdk_completion_reports_the_requested_depth(client: openai.OpenAI) -> None:
    out = greedy(client, 5)
    assert out.object == "text_completion"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.model_extra["recurrence"] == {"mean_depth": 5.0, "total_loops": 5 * (
        out.usage.prompt_tokens + 11)}  # fmt: skip


def test_streaming_text_equals_the_non_streaming_text(client: openai.OpenAI) -> None:
    full = greedy(client, 3).choices[0].text
    chunks = list(
        client.completions.create(
            model=model_id(client),
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            seed=3,
            stream_options={"include_usage": True},
            extra_body={"recurrence_depth": 3},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sse_wire_format_ends_with_done(live_server: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{live_server}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "text_completion" and first["choices"][0]["index"] == 0


def test_n_choices_and_prompt_lists(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=model_id(client), prompt=["a = 1", "b = 2"], n=2, max_tokens=3, seed=5
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12


def test_token_id_prompts_are_taken_as_given(live_server: str, client: openai.OpenAI) -> None:
    ids = httpx.post(f"{live_server}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = greedy(client, 2).choices[0].text
    by_ids = client.completions.create(
        model=model_id(client), prompt=ids, max_tokens=12, temperature=0, seed=3,
        extra_body={"recurrence_depth": 2},
    )  # fmt: skip
    assert by_ids.choices[0].text == by_text
    text = httpx.post(f"{live_server}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == PROMPT


def test_stop_string_cuts_the_text_before_it(client: openai.OpenAI) -> None:
    full = greedy(client, 2, max_tokens=20).choices[0].text
    stop = full[5:8]
    assert len(stop) == 3
    out = greedy(client, 2, max_tokens=20, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model_id(client),
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stop=stop,
            stream=True,
            seed=3,
            extra_body={"recurrence_depth": 2},
        )
    )
    assert streamed == out.choices[0].text


def test_echo_with_zero_max_tokens_scores_the_prompt(client: openai.OpenAI, live_server) -> None:
    ids = httpx.post(f"{live_server}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    out = client.completions.create(
        model=model_id(client), prompt=PROMPT, max_tokens=0, echo=True, logprobs=1
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text == PROMPT
    assert len(lp.token_logprobs) == len(ids) - 1  # the server's BOS is not echoed
    assert all(v < 0 for v in lp.token_logprobs)  # every prompt token scored, the first after BOS
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)


def test_logprobs_carry_top_alternatives_and_depths(client: openai.OpenAI) -> None:
    out = greedy(client, 4, logprobs=3, max_tokens=5)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.top_logprobs) == 5
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(
        abs(v - max(t.values())) < 1e-5
        for v, t in zip(lp.token_logprobs, lp.top_logprobs, strict=False)
    )
    assert lp.model_extra["depths"] == [4] * 5


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        out = client.completions.create(
            model=model_id(client), prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed
        )
        return out.choices[0].text

    assert run(11) == run(11)
    assert len({run(s) for s in (1, 2, 3, 4)}) > 1


def test_mixed_depths_in_one_batch_match_each_alone(live_server: str, client) -> None:
    alone = {d: greedy(client, d).choices[0].text for d in (1, 4, 9)}

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=live_server, timeout=60) as http:

            async def one(depth: int) -> tuple[int, str]:
                body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "seed": 3,
                        "recurrence_depth": depth}  # fmt: skip
                r = await http.post("/v1/completions", json=body)
                return depth, r.json()["choices"][0]["text"]

            return await asyncio.gather(*(one((1, 4, 9)[i % 3]) for i in range(9)))

    for depth, text in asyncio.run(burst()):
        assert text == alone[depth]


# Lifecycle -------------------------------------------------------------------------------------


def test_client_disconnect_mid_stream_frees_the_slot(live_server: str) -> None:
    aborted = metric(live_server, "parcae_requests_total", "abort")
    body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{live_server}/v1/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    assert wait_for(lambda: metric(live_server, "parcae_requests_running") == 0)
    assert wait_for(lambda: metric(live_server, "parcae_kv_cache_used_bytes") == 0)
    assert metric(live_server, "parcae_requests_total", "abort") == aborted + 1


def test_client_gone_before_a_non_streaming_answer_frees_the_slot(live_server: str) -> None:
    aborted = metric(live_server, "parcae_requests_total", "abort")
    body = {"prompt": PROMPT, "max_tokens": 450, "ignore_eos": True, "recurrence_depth": 16}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server}/v1/completions", json=body, timeout=0.5)
    assert wait_for(lambda: metric(live_server, "parcae_requests_running") == 0)
    assert metric(live_server, "parcae_requests_total", "abort") == aborted + 1
    assert wait_for(lambda: metric(live_server, "parcae_kv_cache_used_bytes") == 0)


def test_full_queue_answers_429_with_retry_after(tiny_model_dir) -> None:
    with running_server(tiny_model_dir, "--max-batch", "1", "--max-queue", "1") as server:
        url = server.url

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                body = {"prompt": PROMPT, "max_tokens": 64, "ignore_eos": True}
                return await asyncio.gather(
                    *(http.post("/v1/completions", json=body) for _ in range(6))
                )

        statuses = [r.status_code for r in asyncio.run(burst())]
        assert 200 in statuses and 429 in statuses
        rejected = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["type"] == "rate_limit_exceeded"
        assert wait_for(lambda: metric(url, "parcae_kv_cache_used_bytes") == 0)


def test_tiny_temperature_samples_like_greedy(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=model_id(client), prompt=PROMPT, max_tokens=6, temperature=1e-45, seed=3,
        extra_body={"recurrence_depth": 3},
    )  # fmt: skip
    assert out.choices[0].text == greedy(client, 3, max_tokens=6).choices[0].text


def test_full_queue_refuses_streams_with_429_before_the_stream_starts(tiny_model_dir) -> None:
    with running_server(tiny_model_dir, "--max-batch", "1", "--max-queue", "0") as server:

        async def burst() -> list[tuple[int, list[str]]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                body = {"prompt": PROMPT, "max_tokens": 48, "ignore_eos": True, "stream": True}

                async def one() -> tuple[int, list[str]]:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        return r.status_code, [x async for x in r.aiter_lines() if x]

                return await asyncio.gather(*(one() for _ in range(4)))

        results = asyncio.run(burst())
        assert {status for status, _ in results} == {200, 429}
        for status, lines in results:
            if status == 200:  # a started stream always carries its tokens and a finish reason
                assert lines[-1] == "data: [DONE]" and len(lines) > 2
        assert wait_for(lambda: metric(server.url, "parcae_kv_cache_used_bytes") == 0)


def test_api_key_is_required_when_set(tiny_model_dir) -> None:
    with running_server(tiny_model_dir, "--api-key", "s3cret") as server:
        url = server.url
        body = {"prompt": "x", "max_tokens": 1}
        denied = httpx.post(f"{url}/v1/completions", json=body)
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.post(f"{url}/v1/completions", json=body,
                        headers={"Authorization": "Bearer s3cret"})  # fmt: skip
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_sigterm_drains_running_requests_and_refuses_new_ones(tiny_model_dir) -> None:
    with running_server(tiny_model_dir, "--drain-grace", "30") as server:
        url, result = server.url, {}

        def stream() -> None:
            body = {"prompt": PROMPT, "max_tokens": 150, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            result["reason"] = chunks[-2]["choices"][0]["finish_reason"]
            result["tokens"] = chunks[-1]["usage"]["completion_tokens"]

        worker = threading.Thread(target=stream)
        worker.start()
        assert wait_for(lambda: metric(url, "parcae_requests_running") == 1)
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(f"{url}/health").status_code == 503)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503
        worker.join(timeout=60)
        assert result == {"reason": "length", "tokens": 150}
        assert server.proc.wait(timeout=20) == 0  # a clean drain


# Bad input -------------------------------------------------------------------------------------

BAD = [
    ("{not json", 400, None),
    (json.dumps({"max_tokens": 3}), 400, "prompt"),
    (json.dumps({"prompt": "x", "temperature": 5}), 400, "temperature"),
    (json.dumps({"prompt": "x", "logprobs": 50}), 400, "logprobs"),
    (json.dumps({"prompt": "x", "n": 0}), 400, "n"),
    (json.dumps({"prompt": "x", "max_tokens": -1}), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "recurrence_depth": 0}), 400, "recurrence_depth"),
    (json.dumps({"prompt": "x", "recurrence_depth": 33}), 400, "recurrence_depth"),
    (
        json.dumps(
            {
                "prompt": "x",
                "recurrence_depth": 4,
                "recurrence_exit": {"criterion": "kl", "threshold": 0.1, "min_depth": 9},
            }
        ),
        400,
        "recurrence_exit.min_depth",
    ),
    (
        json.dumps({"prompt": "x", "recurrence_exit": {"criterion": "cosine", "threshold": 1}}),
        400,
        "recurrence_exit.criterion",
    ),
    (
        json.dumps(
            {
                "prompt": "x",
                "recurrence_exit": {"criterion": "auto", "threshold": 0.1, "max_nll_cost": 0.01},
            }
        ),
        400,
        "recurrence_exit",
    ),
    (json.dumps({"prompt": [5] * 600}), 400, "prompt"),
    (json.dumps({"prompt": [10**6]}), 400, "prompt"),
    (json.dumps({"prompt": []}), 400, "prompt"),
    (json.dumps({"prompt": "x", "model": "no-such-model"}), 404, "model"),
    (json.dumps({"prompt": {"a": 1}}), 400, "prompt"),
    (json.dumps({"prompt": "x", "kv_policy": "every-other"}), 400, "kv_policy"),
    (
        json.dumps({"prompt": "x", "stop_token_ids": [10**6], "min_tokens": 2}),
        400,
        "stop_token_ids",
    ),
    (json.dumps({"prompt": "x", "stop_token_ids": [-1]}), 400, "stop_token_ids"),
    (json.dumps({"prompt": "x", "repetition_penalty": 1e-300}), 400, "repetition_penalty"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_bad_input_gets_an_openai_error_body(live_server: str, body, status, param) -> None:
    r = httpx.post(f"{live_server}/v1/completions", content=body,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param


def test_each_listed_model_can_be_retrieved(client: openai.OpenAI) -> None:
    names = [m.id for m in client.models.list().data]
    for name in names[:3] + names[-2:]:  # the served id, an alias or preset, ID@T<n>
        assert client.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model" * 100)
    error = err.value.body
    assert error["code"] == "model_not_found" and len(error["message"]) < 300


def test_any_name_a_request_may_use_can_be_retrieved(client: openai.OpenAI) -> None:
    """`ID@T<n>` works for any n up to --max-depth, listed or not: so does its retrieve."""
    served = model_id(client)
    listed = {m.id for m in client.models.list().data}
    assert f"{served}@T5" not in listed
    card = client.models.retrieve(f"{served}@T5")
    assert (card.id, card.parent, card.recurrence) == (
        f"{served}@T5",
        served,
        {"recurrence_depth": 5},
    )
    for refused in (f"{served}@T0", f"{served}@T999", f"{served}@nope", "other@T5"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(refused)


def test_oversize_prompt_says_context_length_exceeded(live_server: str) -> None:
    r = httpx.post(f"{live_server}/v1/completions", json={"prompt": [5] * 600})
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_is_clipped_to_the_context(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=model_id(client), prompt=[5] * 500, max_tokens=100, temperature=0,
        extra_body={"ignore_eos": True, "recurrence_depth": 1},
    )  # fmt: skip
    assert out.usage.completion_tokens == 11  # block_size 512 - (BOS + 500 prompt tokens)
    assert out.choices[0].finish_reason == "length"


def test_unknown_route_and_method_use_the_error_body(live_server: str) -> None:
    r = httpx.get(f"{live_server}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{live_server}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_models_health_version(live_server: str) -> None:
    card = httpx.get(f"{live_server}/v1/models").json()["data"][0]
    assert card["recurrence"] == {"mean_recurrence": 3, "default_depth": 3, "max_depth": 32,
                                  "prelude": 1, "recurrent": 2, "coda": 1, "kv_policy": "per-loop",
                                  "kv_policy_reason": "set by --kv-policy", "presets": {},
                                  "kv_cache_dtype": "float32"}  # fmt: skip
    assert httpx.get(f"{live_server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live_server}/version").json()["version"]
