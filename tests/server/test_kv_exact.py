"""Exact KV caching under every loop-slot policy: chunked prefill equals one-chunk prefill, a
prefix hit equals a cold run, preemption never changes output, and `auto` is lossy only where
a checkpoint's calibration measured it within the bound."""

from __future__ import annotations

import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.parcae import CausalContext
from parcae_serve.server.engine.engine import Engine, EngineConfig
from parcae_serve.server.engine.kv_cache import KVCache, LoopSlotPolicy, choose_policy
from parcae_serve.server.engine.runner import NOISE_STRIDE
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.scheduler import SchedulerConfig
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, RecurrenceExit
from tests.helpers import outputs_together, prefix_hit_tokens, random_model

NOISY = ParcaeConfig(
    n_embd=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
    value_embed_layers=[1, 2], mean_recurrence=3, state_init="normal",
)  # fmt: skip
LOSSY = ["first:2", "shared:1", "shared:2", "last:2"]
PROMPT = [(7 * i + 3) % 97 for i in range(37)]


def make_engine(policy: str, chunk: int = 4, kv_bytes: int = 8 * 2**20, **kw) -> Engine:
    sched = SchedulerConfig(max_batch=kw.pop("max_batch", 16), prefill_chunk=chunk)
    config = EngineConfig(sched, kv_policy=policy, kv_cache_bytes=kv_bytes, block_size=4, **kw)
    engine = Engine(random_model(NOISY), config)
    engine.start()
    return engine


def request(prompt=PROMPT, depth: int = 5, seed: int = 3, max_tokens: int = 10, **kw):
    policy = kw.pop("policy", None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, seed=seed, logprobs=1, **kw)
    return EngineRequest(list(prompt), params, LoopParams(depth, kv_policy=policy))


def result(outputs) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """(tokens, their logprobs, prompt logprobs if scored)."""
    sampled = [o for o in outputs if o.token is not None]
    scores = next((o.prompt_scores for o in outputs if o.prompt_scores is not None), None)
    return (
        [o.token for o in sampled],
        torch.tensor([o.logprob for o in sampled]),
        None if scores is None else torch.tensor([lp for lp, _ in scores]),
    )


def assert_same(got, want) -> None:
    assert got[0] == want[0]
    assert torch.allclose(got[1], want[1], atol=1e-4)
    if want[2] is not None:
        assert torch.allclose(got[2], want[2], atol=1e-4)


@torch.inference_mode()
def no_cache_forward(model, prompt: list[int], depth: int, seed: int) -> torch.Tensor:
    """The plain whole-sequence forward with the engine's per-position h_0 noise streams."""
    ids = torch.tensor([prompt])
    positions = torch.arange(len(prompt))[None]
    rots, ctx = model.rotations(positions), CausalContext()
    e = model.prelude(ids, rots, ctx)
    prepared = model.transformer["adapter"].prepare(e)
    g, rows = torch.Generator(), []
    for p in range(len(prompt)):
        g.manual_seed(seed * NOISE_STRIDE + p)
        rows.append(model.initial_state(1, 1, [g], e)[0, 0])
    h = torch.stack(rows)[None]
    for t in range(depth):
        h = model.core(h, prepared, ids, rots, ctx, t)
    return model.coda(h, ids, rots, ctx)[0]


def run_together(eng: Engine, requests: list[EngineRequest]) -> list:
    return [result(outs) for outs in outputs_together(eng, requests)]


@pytest.mark.parametrize("policy", ["per-loop", *LOSSY])
def test_chunked_prefill_equals_one_chunk_prefill(policy: str) -> None:
    chunked, whole = make_engine(policy, chunk=4), make_engine(policy, chunk=4096)
    try:
        sizes: list[int] = []
        plan = chunked.scheduler.plan

        def recording_plan():
            work = plan()
            sizes.extend(w.end - w.start for w in work)
            return work

        chunked.scheduler.plan = recording_plan
        req = request(prompt_logprobs=0)
        got = result(chunked.generate_sync(req))
        assert max(sizes) == 4  # the prompt really went through in chunks
        want = result(whole.generate_sync(req))
        assert_same(got, want)
        # the prompt's scores are the no-cache forward's under any policy
        logits = no_cache_forward(chunked.model, PROMPT, 5, seed=3)
        ref = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(PROMPT[1:])[:, None])
        assert torch.allclose(got[2], ref[:, 0], atol=1e-4)
    finally:
        chunked.stop()
        whole.stop()


@pytest.mark.parametrize("policy", ["per-loop", *LOSSY])
def test_prefill_keeps_every_loop_then_only_the_policy_slots(policy: str) -> None:
    config = EngineConfig(SchedulerConfig(prefill_chunk=8), policy, kv_cache_bytes=8 * 2**20)
    eng = Engine(random_model(NOISY), config)
    out: list = []
    seq = eng.submit(request(max_tokens=3), out.append)
    eng.step()  # admitted, first chunk of 8 prompt tokens
    cache = eng.cache
    assert seq.table.num_slots == 5 and seq.table.prefilling
    assert cache.used_bytes == cache.blocks_for(len(PROMPT) + 1) * cache.bundle_bytes(5)
    while seq.computed < len(PROMPT):
        eng.step()
    slots = LoopSlotPolicy.parse(policy).num_slots(5)
    assert seq.table.num_slots == slots and not seq.table.prefilling
    published = len(cache.prefix)  # full prompt blocks keep every loop for reuse
    expected = published * cache.bundle_bytes(5)
    expected += (len(seq.table.bundles) - published) * cache.bundle_bytes(slots)
    assert cache.used_bytes == expected
    while not out or out[-1].finish_reason is None:
        eng.step()
    assert cache.used_bytes == 0


@pytest.mark.parametrize("policy", ["per-loop", *LOSSY])
def test_prefix_hit_equals_a_cold_run(policy: str) -> None:
    eng, fresh = make_engine(policy, chunk=8), make_engine(policy, chunk=8)
    try:
        loops = eng.metrics.loops._value.get
        cold_out = eng.generate_sync(request())
        hits, cold_loops = eng.cache.prefix_hits, loops()
        warm_out = eng.generate_sync(request())
        assert prefix_hit_tokens(eng.cache, hits) == (len(PROMPT) - 1) // 4 * 4
        assert loops() - cold_loops == 10 * 5  # only the last prompt token and 9 fed back
        assert_same(result(warm_out), result(cold_out))
        usage = [(o[-1].positions, o[-1].total_loops) for o in (warm_out, cold_out)]
        assert usage[0] == usage[1]  # cached positions count as in a cold run
        # a longer prompt sharing the prefix equals its own cold run on a fresh engine
        longer = [*PROMPT, 5, 6, 7, 8, 9, 10]
        hits = eng.cache.prefix_hits
        assert_same(result(eng.generate_sync(request(longer))),
                    result(fresh.generate_sync(request(longer))))  # fmt: skip
        assert prefix_hit_tokens(eng.cache, hits) > 0
    finally:
        eng.stop()
        fresh.stop()


def test_prefix_blocks_are_shared_across_policies() -> None:
    eng, fresh = make_engine("first:2"), make_engine("first:2")
    try:
        eng.generate_sync(request())
        shared = LoopSlotPolicy.parse("shared:1")
        hits = eng.cache.prefix_hits
        got = result(eng.generate_sync(request(policy=shared)))
        assert prefix_hit_tokens(eng.cache, hits) > 0
        assert_same(got, result(fresh.generate_sync(request(policy=shared))))
    finally:
        eng.stop()
        fresh.stop()


def test_prefix_hit_with_exits_equals_a_cold_run() -> None:
    eng, fresh = make_engine("first:2", chunk=8), make_engine("first:2", chunk=8)
    try:
        rule = RecurrenceExit("residual", 0.2, 2)
        req = EngineRequest(PROMPT, SamplingParams(max_tokens=6, seed=1), LoopParams(8, rule))
        eng.generate_sync(req)
        hits = eng.cache.prefix_hits
        warm = eng.generate_sync(req)
        assert prefix_hit_tokens(eng.cache, hits) > 0
        cold = fresh.generate_sync(req)
        assert [(o.token, o.depth) for o in warm] == [(o.token, o.depth) for o in cold]
    finally:
        eng.stop()
        fresh.stop()


@pytest.mark.parametrize(
    ("policy", "kv_dtype"),
    [("per-loop", None), *((p, None) for p in LOSSY), ("shared:1", torch.float8_e4m3fn)],
)
def test_preemption_never_changes_output(policy: str, kv_dtype: torch.dtype | None) -> None:
    # a pool of 24 bundles; four sequences of 12 bundles each cannot all stay resident (fp8:
    # bundles of one-byte K/V, swapped out to host memory and back)
    probe = KVCache(NOISY, LoopSlotPolicy.parse(policy), 0, typical_depth=3, block_size=4,
                    dtype=kv_dtype or torch.float32)  # fmt: skip
    eng = make_engine(policy, chunk=8, kv_bytes=24 * probe.bundle_bytes(probe.policy.num_slots(3)),
                      kv_cache_dtype=kv_dtype)  # fmt: skip
    try:
        prompts = [PROMPT[i : i + 7] for i in range(4)]
        reqs = [request(p, depth=4, seed=i, max_tokens=38) for i, p in enumerate(prompts)]
        alone = [result(eng.generate_sync(r)) for r in reqs]
        assert eng.scheduler.preemptions == 0
        together = run_together(eng, reqs)
        assert eng.scheduler.preemptions > 0
        for got, want in zip(together, alone, strict=True):
            assert_same(got, want)
        eng.step()  # the idle engine publishes its counters
        assert eng.metrics.preemptions._value.get() == eng.scheduler.preemptions
        assert eng.cache.used_bytes == 0
    finally:
        eng.stop()


def test_a_prompt_too_long_for_every_loop_prefills_whole_in_the_policy_layout() -> None:
    probe = KVCache(NOISY, LoopSlotPolicy.parse("shared:1"), 0, typical_depth=3, block_size=4)
    eng = make_engine("shared:1", chunk=4, kv_bytes=16 * probe.bundle_bytes(1))
    ref = make_engine("shared:1", chunk=4096)
    try:
        prompt = PROMPT + PROMPT[:11]  # 12 blocks: at depth 5 every loop would need 60
        req = request(prompt, max_tokens=4, prompt_logprobs=0)
        assert_same(result(eng.generate_sync(req)), result(ref.generate_sync(req)))
    finally:
        eng.stop()
        ref.stop()


# --kv-policy auto -----------------------------------------------------------------------------


def calibration(costs: dict[str, dict[int, float]]) -> dict:
    rows = [
        {"policy": p, "depth": d, "nll_cost": c, "bytes_per_token": 100 * LoopSlotPolicy.parse(p).num_slots(d)}
        for p, by_depth in costs.items()
        for d, c in by_depth.items()
    ]  # fmt: skip
    return {"kv_policies": {"rows": rows}}


def test_auto_is_per_loop_without_a_measured_table() -> None:
    for table in (None, {"loss_by_depth": {"3": 3.0}}, calibration({})):
        policy, reason = choose_policy(table, 0.005, 6)
        assert str(policy) == "per-loop" and "no measured" in reason


def test_auto_takes_the_cheapest_policy_within_the_bound_up_to_its_measured_depth() -> None:
    table = calibration(
        {
            "per-loop": {6: 0.0, 12: 0.0},
            "first:2": {6: 0.002, 12: 0.008},
            "shared:1": {6: 0.015, 12: 0.016},
            "last:2": {6: 0.004, 12: 0.004},
        }
    )
    policy, reason = choose_policy(table, 0.005, 6)
    assert (str(policy), policy.upto) == ("first:2", 6)  # ties on bytes: the lower cost
    assert "first:2" in reason and "+0.20%" in reason
    assert policy.num_slots(6) == 2 and policy.num_slots(7) == 7  # exact where unmeasured
    assert [policy.slot(t, 8) for t in range(8)] == list(range(8))
    policy, _ = choose_policy(table, 0.02, 6)
    assert (str(policy), policy.upto) == ("shared:1", 12)
    policy, reason = choose_policy(table, 0.001, 6)
    assert str(policy) == "per-loop" and "0.10%" in reason
    # measured only at other depths than the default: not used
    assert str(choose_policy(table, 0.005, 3)[0]) == "per-loop"


def test_calibration_measures_each_policy_against_per_loop() -> None:
    from parcae_serve.server.calibration.calibrate import KV_POLICIES, kv_policy_table

    model = random_model(NOISY)
    data = [[(5 * i + j) % 97 + 1 for i in range(10)] for j in range(2)]
    table = kv_policy_table(model, data, 3, log=lambda *_: None)
    rows = {(r["policy"], r["depth"]): r for r in table["rows"]}
    assert set(rows) == {(p, d) for p in ["per-loop", *KV_POLICIES] for d in (3, 6)}
    assert rows["per-loop", 6]["nll_cost"] == 0
    assert rows["shared:1", 6]["nll_cost"] != 0  # one slot for 6 loops changes what is read
    assert rows["shared:1", 6]["bytes_per_token"] < rows["per-loop", 6]["bytes_per_token"]
    policy, reason = choose_policy({"kv_policies": table}, 0.005, 3)
    assert table["recommended"] == {"policy": str(policy), "max_depth": policy.upto or None,
                                    "bound": 0.005, "reason": reason}  # fmt: skip
