"""The compiled decode path (whole tokens in one graph, K/V read in place) against the eager
runner: same tokens, same logprobs, same cache contents, for every policy and depth."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.parcae import Parcae
from parcae_serve.server.engine.engine import Engine, EngineConfig
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.scheduler import SchedulerConfig
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, RecurrenceExit
from tests.conftest import running_server
from tests.helpers import outputs_together, random_model

CFG = ParcaeConfig(
    n_embd=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
    value_embed_layers=[0, 2, 3], mean_recurrence=3,
)  # fmt: skip
PROMPTS = [[1, 5, 7], [2, 9, 11, 3, 4, 8, 20, 21, 22, 30, 31, 40, 41, 42, 43, 44, 45], [7]]


def engine(policy: str, mode: str, depths: list[int]) -> Engine:
    sched = SchedulerConfig(max_batch=8, prefill_chunk=5)
    config = EngineConfig(sched, kv_policy=policy, kv_cache_bytes=4 * 2**20, compile=mode)
    eng = Engine(random_model(CFG), config)
    eng.compile_decode(depths)
    eng.start()
    return eng


def run_all(eng: Engine, requests: list[EngineRequest]) -> list[tuple[list[int], list[float]]]:
    """Every request in one batch; each one's generated tokens and their logprobs."""
    results = []
    for outs in outputs_together(eng, requests, timeout=60):
        got = [o for o in outs if o.token is not None]
        results.append(([o.token for o in got], [o.logprob for o in got]))
    return results


def requests(depths: list[int], **loops) -> list[EngineRequest]:
    params = SamplingParams(max_tokens=14, temperature=0, logprobs=1)
    return [EngineRequest(list(p), params, LoopParams(d, **loops)) for p in PROMPTS for d in depths]


def assert_same(got, want) -> None:
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4)


@pytest.mark.parametrize("policy", ["per-loop", "first:2", "shared:1", "last:2"])
def test_decode_graph_equals_the_eager_runner_for_every_policy_and_depth(policy: str) -> None:
    depths = [1, 2, 3, 5]
    reqs = requests(depths)
    ref, fast = engine(policy, "off", []), engine(policy, "eager", depths)
    try:
        got = run_all(fast, reqs)
        assert_same(got, run_all(ref, reqs))
        # every token after the first (which comes out of prefill) went through the graph, and
        # so did one-token prefill chunks
        assert fast.metrics.compiled_tokens._value.get() >= sum(len(t) - 1 for t, _ in got)
        assert ref.metrics.compiled_tokens._value.get() == 0
    finally:
        ref.stop()
        fast.stop()


def test_rows_the_graph_cannot_run_take_the_eager_runner_in_the_same_batch() -> None:
    # depth 4 is not warmed up and exit rules loop eagerly: they share steps with graph rows
    reqs = requests([3, 4]) + requests([3], exit=RecurrenceExit("residual", 0.3, 1))
    ref, fast = engine("first:2", "off", []), engine("first:2", "eager", [3])
    try:
        got = run_all(fast, reqs)
        assert_same(got, run_all(ref, reqs))
        graph_rows = sum(len(t) - 1 for (t, _), r in zip(got, reqs, strict=True)
                         if r.loops.depth == 3 and r.loops.exit is None)  # fmt: skip
        assert fast.metrics.compiled_tokens._value.get() >= graph_rows
    finally:
        ref.stop()
        fast.stop()


def test_inductor_compiled_decode_equals_eager() -> None:
    """The real compiler, once (one depth serves every policy and batch size)."""
    torch._dynamo.reset()
    reqs = requests([2])
    ref, fast = engine("per-loop", "off", []), engine("per-loop", "inductor", [2])
    try:
        assert_same(run_all(fast, reqs), run_all(ref, reqs))
        assert_same(run_all(fast, reqs[:1]), run_all(ref, reqs[:1]))  # one row: its own graph
    finally:
        ref.stop()
        fast.stop()


def test_server_warms_its_decode_graphs_before_it_is_ready(tiny_model_dir) -> None:
    """`--compile` plumbing over HTTP: graphs for the listed depths exist before /health is
    200, serve the decode tokens of those depths, and change no output."""
    body = {"prompt": "def f(x):", "max_tokens": 12, "temperature": 0, "logprobs": 1,
            "recurrence_depth": 3}  # fmt: skip
    results = {}
    for mode in ("off", "eager"):
        with running_server(tiny_model_dir, "--compile", mode, "--compile-depths", "2,3") as s:
            out = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()
            metrics = httpx.get(f"{s.url}/metrics").text
        compiled = float(
            re.search(r"^parcae_compiled_decode_tokens_total\{[^}]*\} (\S+)$", metrics, re.M)[1]
        )
        results[mode] = (out["choices"][0]["text"], out["choices"][0]["logprobs"], compiled)
    (text, logprobs, none), (fast_text, fast_logprobs, some) = results["off"], results["eager"]
    assert fast_text == text and none == 0 and some >= 10
    want, got = logprobs["token_logprobs"], fast_logprobs["token_logprobs"]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)


def test_default_kernel_threads_leave_a_core_to_http_unless_weights_stream_from_memory() -> None:
    from parcae_serve.server.api.app import kernel_threads

    assert kernel_threads(random_model(CFG), cores=2) == 1
    assert kernel_threads(random_model(CFG), cores=1) == 1
    big = ParcaeConfig(n_embd=1024, num_attention_heads=8, vocab_size=32768, n_layers_in_coda=4)
    with torch.device("meta"):
        assert kernel_threads(Parcae(big), cores=2) == 2
