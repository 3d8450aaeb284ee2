"""The compiled decode path (whole tokens in one graph, K/V read in place) against the eager
runner: same tokens, same logprobs, same cache contents, for every policy and depth."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.loading import builtin_checkpoint, read_config
from parcae_serve.model.parcae import Parcae
from parcae_serve.server.engine.decode_graph import merge_keys
from parcae_serve.server.engine.engine import Engine, EngineConfig
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.scheduler import SchedulerConfig
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, RecurrenceExit
from tests.conftest import running_server
from tests.helpers import outputs_together, random_model, wall_clock

CFG = ParcaeConfig(
    n_embd=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
    value_embed_layers=[0, 2, 3], mean_recurrence=3,
)  # fmt: skip
PROMPTS = [[1, 5, 7], [2, 9, 11, 3, 4, 8, 20, 21, 22, 30, 31, 40, 41, 42, 43, 44, 45], [7]]


def engine(policy: str, mode: str, depths: list[int], **kw) -> Engine:
    sched = SchedulerConfig(max_batch=8, prefill_chunk=5)
    config = EngineConfig(sched, kv_policy=policy, kv_cache_bytes=4 * 2**20, compile=mode, **kw)
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


def requests(depths: list[int], logprobs: int | None = 1, **loops) -> list[EngineRequest]:
    """Greedy requests; without `logprobs` the graph's own argmax and logprob are the token's."""
    params = SamplingParams(max_tokens=14, temperature=0, logprobs=logprobs)
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
        plain = requests(depths, logprobs=None)
        assert_same(run_all(fast, plain), run_all(ref, plain))
        got = run_all(fast, reqs)
        assert_same(got, run_all(ref, reqs))
        # every token after the first (which comes out of prefill) went through the graph, and
        # so did one-token prefill chunks
        assert fast.metrics.compiled_tokens._value.get() >= sum(len(t) - 1 for t, _ in got)
        assert ref.metrics.compiled_tokens._value.get() == 0
        # so did prefill chunks of two or more tokens (a step's budget of 5 prompt tokens is
        # shared, so some chunks are single tokens; repeats hit the prefix cache), and their
        # K/V served the decode tokens above
        assert fast.metrics.compiled_prefill._value.get() >= len(depths) * (3 + 17) // 2
        assert ref.metrics.compiled_prefill._value.get() == 0
    finally:
        ref.stop()
        fast.stop()


class CallLog:
    """A decoder that notes the row depths of every graph call and passes it on."""

    def __init__(self, decoder) -> None:
        self.decoder, self.depths = decoder, []

    def __call__(self, depth, batch, key):
        self.depths.append(sorted(set(batch.depths.tolist())))
        return self.decoder(depth, batch, key)

    def __getattr__(self, name: str):
        return getattr(self.decoder, name)


@pytest.mark.parametrize("policy", ["per-loop", "shared:2", "first:2"])
def test_rows_of_several_depths_share_one_graph_call_and_decode_as_the_eager_runner(policy):
    """merge_keys: rows of depths 2, 3 and 4 run in one call at depth 4, the shallower keeping
    their state after their own loops and writing only their own slots; tokens, logprobs and
    (through every later token) the K/V they wrote match the eager runner's."""
    depths = [2, 3, 4]
    reqs = requests(depths)
    ref, fast = engine(policy, "off", []), engine(policy, "eager", depths)
    fast.runner.decoder = log = CallLog(fast.runner.decoder)
    try:
        assert_same(run_all(fast, reqs), run_all(ref, reqs))
        assert [2, 3, 4] in log.depths
    finally:
        ref.stop()
        fast.stop()


def test_merge_keys_joins_prefix_slots_while_the_loops_run_in_vain_stay_bounded() -> None:
    def key(depth: int, slot=lambda t: t) -> tuple:
        return depth, tuple(slot(t) for t in range(depth))

    assert merge_keys({key(4): 11, key(6): 11, key(8): 10}) == [[key(8), key(6), key(4)]]
    last2 = lambda d: lambda t: max(0, t - (d - 2))  # noqa: E731  (last:2: slots depend on d)
    assert merge_keys({key(4, last2(4)): 8, key(6, last2(6)): 8}) == [
        [key(6, last2(6))],
        [key(4, last2(4))],
    ]
    # one deep row and many shallow ones: 16 x 32 row-loops for 78 needed stay two calls
    assert merge_keys({key(16): 1, key(2): 31}) == [[key(16)], [key(2)]]


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_narrow_kv_cache_decodes_as_the_eager_runner(kv_dtype) -> None:
    """--kv-cache-dtype: an fp32 model over fp16 / bf16 / fp8 pools. The graph (with the CPU kernel
    for batches, and over fp8 for single rows too) rounds its own K/V as the pools store them, so
    it matches the eager runner, which writes them there and reads them back."""
    depths = [2, 3]
    reqs = requests(depths)
    ref = engine("first:2", "off", [], kv_cache_dtype=kv_dtype)
    fast = engine("first:2", "eager", depths, kv_cache_dtype=kv_dtype)
    fp32 = engine("first:2", "off", [])
    try:
        assert fast.cache.outer_k.dtype == fast.cache.rec_k.dtype == kv_dtype
        assert fast.runner.decoder.fused  # batches attend in the kernel, from half pools
        got = run_all(fast, reqs)
        assert_same(got, run_all(ref, reqs))
        assert fast.metrics.compiled_tokens._value.get() >= sum(len(t) - 1 for t, _ in got)
        # the rounding is real: an fp32 cache gives other logprobs
        exact = run_all(fp32, reqs)
        assert any(lp != ref_lp for (_, lp), (_, ref_lp) in zip(got, exact, strict=True))
    finally:
        for eng in (ref, fast, fp32):
            eng.stop()


@wall_clock
def test_a_step_that_only_prefilled_keeps_the_engine_stepping() -> None:
    """A step whose only work was a prefill chunk run by its graph has more to do at once (the
    sequence's first token): the engine must not sleep until the next request (0.5 s)."""
    eng = engine("per-loop", "eager", [2])
    try:
        request = EngineRequest([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=3), LoopParams(2))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            eng.generate_sync(request)
            times.append(time.perf_counter() - start)
        assert eng.metrics.compiled_prefill._value.get() > 0
        assert min(times) < 0.3, times  # a sleep would make every one of them 0.5 s or more
    finally:
        eng.stop()


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


def test_default_kernel_threads_leave_a_core_to_http_only_for_a_tiny_model() -> None:
    from parcae_serve.server.api.app import kernel_threads

    assert kernel_threads(random_model(CFG), cores=2) == 1
    assert kernel_threads(random_model(CFG), cores=1) == 1
    builtin = ParcaeConfig.from_dict(read_config(builtin_checkpoint()))  # 33 MiB in fp32
    big = ParcaeConfig(n_embd=1024, num_attention_heads=8, vocab_size=32768, n_layers_in_coda=4)
    with torch.device("meta"):
        assert kernel_threads(Parcae(builtin), cores=2) == 2
        assert kernel_threads(Parcae(big), cores=2) == 2


def omp_threads_here() -> int:
    """OpenMP's thread count for the calling OS thread (torch.get_num_threads does not say)."""
    info = torch.__config__.parallel_info()
    return int(re.search(r"omp_get_max_threads\(\) : (\d+)", info)[1])


def test_the_engine_thread_runs_its_kernels_on_the_configured_thread_count() -> None:
    """OpenMP keeps the thread count per OS thread: a count set where the engine was built
    never reached the engine's own thread, whose kernels then ran on every core."""
    seen: list[int] = []
    before = torch.get_num_threads()  # torch also keeps a process-wide count: restored below
    config = EngineConfig(SchedulerConfig(max_batch=2), kv_cache_bytes=2**20, threads=3)
    eng = Engine(random_model(CFG), config)
    step = eng.step

    def counted_step() -> bool:  # runs in the engine's thread
        seen.append(omp_threads_here())
        return step()

    eng.step = counted_step
    eng.start()
    try:
        params = SamplingParams(max_tokens=2, temperature=0)
        done = threading.Event()
        request = EngineRequest([1, 2], params, LoopParams(2))
        eng.submit(request, lambda out: out.finish_reason and done.set())
        assert done.wait(30)
    finally:
        eng.stop()
        torch.set_num_threads(before)
    assert seen and set(seen) == {3}


def test_inductor_graphs_compiled_in_one_thread_equal_eager_in_another() -> None:
    """The real compiler, once (one depth serves every policy and batch size). The server
    compiles in a start-up thread and decodes in the engine's thread; torch keeps compiler
    settings per thread, so both must set them. Without that, the first per-loop request at a
    depth whose slot count differs from the recurrent block's layer count recompiled inside a
    request (12 s on a 140m-shaped model)."""
    torch._dynamo.reset()
    depth = CFG.n_layers_in_recurrent_block + 1  # its slots must not equal the layer count
    sched = SchedulerConfig(max_batch=8, prefill_chunk=5)
    config = EngineConfig(sched, kv_policy="per-loop", kv_cache_bytes=4 * 2**20, compile="inductor")
    fast = Engine(random_model(CFG), config)
    warm = threading.Thread(target=fast.compile_decode, args=([depth],))
    warm.start()
    warm.join()
    fast.start()
    ref = engine("per-loop", "off", [])
    reqs = requests([depth])
    try:
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert_same(run_all(fast, reqs), run_all(ref, reqs))  # batches
        assert_same(run_all(fast, reqs[:1]), run_all(ref, reqs[:1]))  # one row: its own graph
        plain = requests([depth], logprobs=None)[:1]  # the token and logprob the graph gives
        assert_same(run_all(fast, plain), run_all(ref, plain))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
        served = fast.metrics.registry.get_sample_value(
            "parcae_compiled_decode_tokens_total", {"model_name": ""}
        )
        assert served >= 13 * len(reqs)  # by the graphs, not the eager fallback
        # served by the graphs compiled ahead (no dynamo guards), whose guards held for three
        # written slots though warm-up wrote one
        checked, fused = fast.runner.decoder._checked, fast.runner.decoder.fused
        assert {(depth, True, fused, 3, 3), (depth, False, fused, 3, 3)} <= checked
    finally:
        ref.stop()
        fast.stop()


def test_the_server_loads_in_a_thread_that_ends_with_the_load() -> None:
    """A pooled loading thread kept its OpenMP pool beside the engine's, and libgomp then
    stopped spinning (1.7x slower decode of a bandwidth-bound model): the load gets a thread
    of its own, gone once it returns, and its result or error reaches the awaiting task."""
    from parcae_serve.server.api.app import in_own_thread

    ran: list[threading.Thread] = []

    def work(x: int) -> int:
        ran.append(threading.current_thread())
        return x + 1

    def fail() -> None:
        raise ValueError("no checkpoint")

    assert asyncio.run(in_own_thread(work, 1)) == 2
    (loader,) = ran
    loader.join(timeout=5)
    assert loader is not threading.main_thread() and not loader.is_alive()
    with pytest.raises(ValueError, match="no checkpoint"):
        asyncio.run(in_own_thread(fail))
