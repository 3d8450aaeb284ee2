"""/metrics after real traffic: the counters add up to what the responses reported."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.conftest import running_server

METRIC = re.compile(r"^(parcae_[a-z0-9_]+(?:\{[^}]*\})?) (\S+)$", re.M)


MODEL_LABEL = re.compile(r'model_name="[^"]*",?')


def scrape(url: str) -> dict[str, float]:
    """Series -> value, keyed without the model_name label every series carries."""
    text = httpx.get(f"{url}/metrics").text
    assert all('model_name="tiny-parcae' in m[1] for m in METRIC.finditer(text))
    return {MODEL_LABEL.sub("", m[1]).replace("{}", "").replace(",}", "}"): float(m[2])
            for m in METRIC.finditer(text)}  # fmt: skip


@pytest.fixture(scope="module")
def fresh_server(tiny_model_dir):
    with running_server(tiny_model_dir, "--kv-policy", "shared:1") as server:
        yield server.url


def test_counters_add_up_after_mixed_traffic(fresh_server: str) -> None:
    before = scrape(fresh_server)
    bodies = [
        {"prompt": "import sys\n", "max_tokens": 7, "recurrence_depth": 2, "seed": 1},
        {"prompt": "class A:\n", "max_tokens": 5, "recurrence_depth": 6, "seed": 2},
        {"prompt": [5, 6, 7, 8], "max_tokens": 9, "ignore_eos": True, "seed": 3,
         "recurrence_depth": 9, "recurrence_exit": {"criterion": "residual", "threshold": 1e9,
                                                    "min_depth": 2}},
    ]  # fmt: skip

    async def traffic() -> list[dict]:
        async with httpx.AsyncClient(base_url=fresh_server, timeout=60) as http:
            rs = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
        return [r.json() for r in rs]

    responses = asyncio.run(traffic())
    after = scrape(fresh_server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    usage = [r["usage"] for r in responses]
    assert delta("parcae_generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert delta("parcae_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    loops = sum(u["recurrence"]["total_loops"] for u in usage)
    assert delta("parcae_recurrence_loops_total") == loops
    assert delta("parcae_recurrence_depth_sum") == loops  # the histogram sums loops per token
    positions = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for u in usage)
    assert delta("parcae_recurrence_depth_count") == positions
    # the huge-threshold request exits every token at min_depth 2 (below its depth 9)
    exiting = usage[2]["prompt_tokens"] + usage[2]["completion_tokens"] - 1
    assert delta("parcae_early_exits_total") == exiting
    assert usage[2]["recurrence"]["mean_depth"] == 2.0
    finished = sum(v - before.get(k, 0.0) for k, v in after.items() if "requests_total" in k)
    assert finished == 3
    assert delta("parcae_time_to_first_token_seconds_count") == 3
    assert delta("parcae_e2e_request_latency_seconds_count") == 3


def test_gauges_return_to_idle(fresh_server: str) -> None:
    httpx.post(f"{fresh_server}/v1/completions", json={"prompt": "x = ", "max_tokens": 3})
    idle = scrape(fresh_server)
    assert idle["parcae_requests_running"] == 0
    assert idle["parcae_requests_waiting"] == 0
    assert idle["parcae_kv_cache_used_bytes"] == 0
    assert idle["parcae_kv_cache_usage_ratio"] == 0


def test_every_contract_metric_is_exported(fresh_server: str) -> None:
    text = httpx.get(f"{fresh_server}/metrics").text
    names = [
        "requests_total", "prompt_tokens_total", "generation_tokens_total",
        "recurrence_loops_total", "early_exits_total", "prefix_cache_queries_total",
        "prefix_cache_hits_total", "requests_running", "requests_waiting",
        "kv_cache_usage_ratio", "kv_cache_used_bytes", "time_to_first_token_seconds_bucket",
        "time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket",
        "queue_time_seconds_bucket", "recurrence_depth_bucket", "batch_size_bucket",
    ]  # fmt: skip
    for name in names:
        assert f"parcae_{name}" in text, name


def test_request_policy_needing_more_slots_than_the_server_is_refused(fresh_server: str) -> None:
    body = {"prompt": "x", "recurrence_depth": 4, "kv_policy": "per-loop"}
    r = httpx.post(f"{fresh_server}/v1/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "kv_policy"
