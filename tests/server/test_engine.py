"""The engine without HTTP: cached decode against the no-cache forward, batching, memory."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.server.engine.engine import Engine, EngineConfig
from parcae_serve.server.engine.kv_cache import KVCache, LoopSlotPolicy
from parcae_serve.server.engine.runner import coda_ready
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.scheduler import SchedulerConfig
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, RecurrenceExit
from tests.helpers import prefix_hit_tokens, random_model

ZERO_INIT = ParcaeConfig(
    n_embd=64, num_attention_heads=4, vocab_size=100, value_embed_layers=[0, 2, 3],
    state_init="zero", mean_recurrence=3,
)  # fmt: skip
NOISY = ParcaeConfig(
    n_embd=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
    value_embed_layers=[1, 2], mean_recurrence=3,
)  # fmt: skip
PROMPT = [1, 5, 7, 9, 11, 3, 4, 8, 20, 21, 22]


def make_engine(cfg: ParcaeConfig = ZERO_INIT, policy: str = "per-loop", **kw) -> Engine:
    sched = SchedulerConfig(
        max_batch=kw.pop("max_batch", 16), prefill_chunk=kw.pop("prefill_chunk", 4)
    )
    config = EngineConfig(
        sched, kv_policy=policy, kv_cache_bytes=kw.pop("kv_bytes", 8 * 2**20), **kw
    )
    engine = Engine(random_model(cfg), config)
    engine.start()
    return engine


@pytest.fixture
def engine():
    eng = make_engine()
    yield eng
    eng.stop()


def greedy(depth: int, max_tokens: int = 8, prompt=PROMPT, **loops) -> EngineRequest:
    return EngineRequest(
        list(prompt),
        SamplingParams(max_tokens=max_tokens, temperature=0),
        LoopParams(depth, **loops),
    )


def tokens(outputs) -> list[int]:
    return [o.token for o in outputs if o.token is not None]


def reference_greedy(model, prompt: list[int], depth: int, n: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(n):
        t = int(model(torch.tensor([ids]), depth)[0, -1].argmax())
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_per_loop_decode_reproduces_the_no_cache_forward(engine: Engine, depth: int) -> None:
    got = tokens(engine.generate_sync(greedy(depth, 10)))
    assert got == reference_greedy(engine.model, PROMPT, depth, 10)


def test_seeded_sampling_is_reproducible_in_a_full_mixed_depth_batch() -> None:
    eng = make_engine(NOISY, "shared:1")
    try:
        params = SamplingParams(max_tokens=12, temperature=1.0, seed=42)
        alone = tokens(eng.generate_sync(EngineRequest(PROMPT, params, LoopParams(4))))
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            p = SamplingParams(max_tokens=12, temperature=1.0, seed=42 if i == 0 else 100 + i)
            depth = 4 if i == 0 else 1 + i % 6
            results[i] = tokens(eng.generate_sync(EngineRequest(PROMPT, p, LoopParams(depth))))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results[0] == alone
        assert len({tuple(v) for v in results.values()}) > 1
    finally:
        eng.stop()


def test_greedy_output_is_identical_alone_and_in_a_full_batch(engine: Engine) -> None:
    alone = {d: tokens(engine.generate_sync(greedy(d))) for d in (1, 3, 6)}
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = tokens(engine.generate_sync(greedy((1, 3, 6)[i % 3])))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        assert got == alone[(1, 3, 6)[i % 3]]


def test_shared_one_slot_bytes_per_token_do_not_grow_with_depth() -> None:
    cache = KVCache(ZERO_INIT, LoopSlotPolicy.parse("shared:1"), 4 * 2**20, typical_depth=3)
    tables = {}
    for depth in (2, 32):
        tables[depth] = cache.new_table(depth, b"")
        before = cache.used_bytes
        assert cache.ensure(tables[depth], 160)
        tables[depth] = cache.used_bytes - before
    assert tables[2] == tables[32] == 160 * cache.token_bytes(32)
    assert cache.token_bytes(2) == cache.token_bytes(32)
    per_loop = KVCache(ZERO_INIT, LoopSlotPolicy.parse("per-loop"), 4 * 2**20, typical_depth=3)
    assert per_loop.token_bytes(32) == per_loop.outer_token_bytes + 32 * per_loop.rec_token_bytes


def test_shared_one_holds_as_many_deep_as_shallow_sequences() -> None:
    for policy, same in (("shared:1", True), ("per-loop", False)):
        eng = make_engine(policy=policy, kv_bytes=2 * 2**20)
        try:
            assert (eng.capacity_tokens(32) == eng.capacity_tokens(2)) is same
        finally:
            eng.stop()


def wait_idle(eng: Engine, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (
        eng.scheduler.running or eng.scheduler.waiting or eng.pool
    ) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_block_accounting_returns_to_zero_after_finish_and_abort(engine: Engine) -> None:
    engine.generate_sync(greedy(3))
    wait_idle(engine)
    assert engine.cache.used_bytes == 0
    outputs = []
    seq = engine.submit(greedy(4, max_tokens=400), outputs.append)
    while len(outputs) < 3:
        time.sleep(0.01)
    engine.abort(seq)
    wait_idle(engine)
    assert outputs[-1].finish_reason == "abort"
    assert engine.cache.used_bytes == 0
    assert not engine.scheduler.running


def test_pool_exhaustion_queues_then_preempts_and_still_matches_reference() -> None:
    # 6 blocks of 16 tokens: four 41-token sequences (3 blocks each) cannot all fit at once
    probe = KVCache(ZERO_INIT, LoopSlotPolicy.parse("per-loop"), 0, typical_depth=3)
    eng = make_engine(kv_bytes=6 * probe.bundle_bytes(3), block_size=16)
    try:
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            results[i] = tokens(eng.generate_sync(greedy(3, max_tokens=30), timeout=120))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = reference_greedy(eng.model, PROMPT, 3, 30)
        assert all(r == expected for r in results.values())
        wait_idle(eng)
        assert eng.cache.used_bytes == 0
        finished = {"model_name": "", "finished_reason": "length"}
        assert eng.metrics.registry.get_sample_value("parcae_requests_total", finished) == 4
        assert eng.scheduler.config.max_batch >= 4  # so memory, not slots, forced the waits
    finally:
        eng.stop()


def test_prefix_hit_skips_prefill_and_gives_identical_greedy_output() -> None:
    eng = make_engine(NOISY, "per-loop", block_size=4)
    try:
        long_prompt = list(range(3, 40))
        params = SamplingParams(max_tokens=6, temperature=0, seed=7)
        loops = eng.metrics.loops._value.get
        before = loops()
        cold = eng.generate_sync(EngineRequest(long_prompt, params, LoopParams(3)))
        hits_before, cold_loops = eng.cache.prefix_hits, loops() - before
        warm = eng.generate_sync(EngineRequest(long_prompt, params, LoopParams(3)))
        assert prefix_hit_tokens(eng.cache, hits_before) == (len(long_prompt) - 1) // 4 * 4
        assert tokens(warm) == tokens(cold)
        # the warm run computed only the uncached tail of the prompt; usage is a cold run's
        assert loops() - before - cold_loops < cold_loops
        assert (warm[-1].positions, warm[-1].total_loops) == (
            cold[-1].positions,
            cold[-1].total_loops,
        )
        wait_idle(eng)
        assert eng.cache.used_bytes == 0  # cached blocks are evictable, not in use
    finally:
        eng.stop()


# Adaptive exit ------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["kl", "residual"])
def test_exit_threshold_zero_equals_fixed_depth(engine: Engine, criterion: str) -> None:
    fixed = engine.generate_sync(greedy(5))
    adaptive = engine.generate_sync(greedy(5, exit=RecurrenceExit(criterion, 0.0, 1)))
    assert tokens(adaptive) == tokens(fixed)
    assert [o.depth for o in adaptive if o.token is not None] == [5] * 8


@pytest.mark.parametrize("criterion", ["kl", "residual"])
def test_huge_threshold_stops_at_min_depth(engine: Engine, criterion: str) -> None:
    out = engine.generate_sync(greedy(9, exit=RecurrenceExit(criterion, 1e9, 3)))
    assert [o.depth for o in out if o.token is not None] == [3] * 8
    assert out[-1].total_loops == 3 * out[-1].positions


@pytest.mark.parametrize(
    ("rule", "wait"),
    [
        (RecurrenceExit("residual", 0.1, 2), 0),
        (RecurrenceExit("kl", 0.02, 2), 0),
        (RecurrenceExit("residual", 0.1, 2), 3),
    ],
    ids=["residual", "kl", "residual-coda-wait-3"],
)
def test_per_row_exits_in_a_batch_equal_each_row_alone(rule: RecurrenceExit, wait: int) -> None:
    """Rows of a batch exit as they would alone (kl: one coda probe for every group; with a
    coda wait, done groups wait for each other's coda and change nothing either)."""
    eng = make_engine(NOISY, "per-loop", coda_wait=wait)
    try:
        requests = [
            EngineRequest(
                PROMPT[: 5 + i],
                SamplingParams(max_tokens=8, temperature=0, seed=i),
                LoopParams(12, rule),
            )
            for i in range(6)
        ]
        alone = [eng.generate_sync(r) for r in requests]
        batched: dict[int, list] = {}

        def run(i: int) -> None:
            batched[i] = eng.generate_sync(requests[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(6):
            assert tokens(batched[i]) == tokens(alone[i])
            assert [o.depth for o in batched[i]] == [o.depth for o in alone[i]]
        depths = {o.depth for out in alone for o in out if o.token is not None}
        assert len(depths) > 1, "the threshold should make rows exit at different loops"
    finally:
        eng.stop()


def test_reported_depths_equal_loops_actually_run() -> None:
    eng = make_engine(NOISY, "shared:1")
    try:
        before = eng.metrics.loops._value.get()
        params = SamplingParams(max_tokens=10, temperature=0, seed=1, prompt_logprobs=0)
        out = eng.generate_sync(
            EngineRequest(PROMPT, params, LoopParams(10, RecurrenceExit("kl", 1e-3, 2)))
        )
        ran = eng.metrics.loops._value.get() - before
        depths = [o.depth for o in out if o.token is not None]
        prompt_depths = next(o.prompt_depths for o in out if o.prompt_depths is not None)
        assert out[-1].total_loops == ran
        # prompt positions' loops, plus each fed-back generated token's (= the next one's depth)
        assert ran == sum(prompt_depths) + sum(depths[1:])
        assert prompt_depths[-1] == depths[0]
        assert all(2 <= d <= 10 for d in depths + prompt_depths)
    finally:
        eng.stop()


def test_a_request_may_bring_a_policy_with_fewer_slots() -> None:
    eng = Engine(random_model(NOISY), EngineConfig(SchedulerConfig(), kv_policy="per-loop"))
    shared_pool = KVCache(NOISY, LoopSlotPolicy.parse("shared:1"), 2**20, typical_depth=3)
    assert not shared_pool.allows(LoopSlotPolicy.parse("per-loop"), 8)
    for policy, expected in ((None, 8), ("shared:1", 1), ("last:2", 2)):
        assert policy is None or eng.cache.allows(LoopSlotPolicy.parse(policy), 8)
        loops = LoopParams(8, kv_policy=policy and LoopSlotPolicy.parse(policy))
        outputs: list = []
        seq = eng.submit(EngineRequest(PROMPT, SamplingParams(max_tokens=3), loops), outputs.append)
        eng.step()  # driven by hand: admitted and prefilled, not finished
        assert seq.table.num_slots == expected
        assert eng.cache.used_bytes == eng.cache.blocks_for(len(PROMPT) + 2) * (
            eng.cache.bundle_bytes(expected)
        )
        while not outputs or outputs[-1].finish_reason is None:
            eng.step()
        assert eng.cache.used_bytes == 0


@pytest.mark.parametrize("policy", ["per-loop", "shared:1", "shared:3", "first:2", "last:2"])
def test_every_policy_serves_exits_and_frees_its_blocks(policy: str) -> None:
    eng = make_engine(NOISY, policy)
    try:
        rule = RecurrenceExit("residual", 0.1, 2)
        params = SamplingParams(max_tokens=10, temperature=0, seed=3)
        out = eng.generate_sync(EngineRequest(PROMPT, params, LoopParams(12, rule)))
        assert out[-1].finish_reason == "length" and len(tokens(out)) == 10
        assert any(o.depth < 12 for o in out)  # some tokens exited and left K/V for skipped loops
        wait_idle(eng)
        assert eng.cache.used_bytes == 0
    finally:
        eng.stop()


def test_slot_policies_map_loops_as_documented() -> None:
    parse = LoopSlotPolicy.parse
    assert [parse("per-loop").slot(t, 6) for t in range(6)] == [0, 1, 2, 3, 4, 5]
    assert [parse("shared:2").slot(t, 6) for t in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [parse("first:2").slot(t, 6) for t in range(6)] == [0, 1, 1, 1, 1, 1]
    assert [parse("last:2").slot(t, 6) for t in range(6)] == [0, 0, 0, 0, 0, 1]
    assert [parse("last:3").slot(t, 6) for t in range(6)] == [0, 0, 0, 0, 1, 2]
    assert parse("shared:4").num_slots(2) == 2
    with pytest.raises(ValueError, match="invalid KV policy"):
        parse("mod:3")


def test_lossy_policy_prefills_exactly_in_chunks_and_reuses_prefixes() -> None:
    """shared:1 keeps one slot, but a prompt keeps every loop's K/V while it prefills: chunk
    after chunk is exact, and its full blocks are reused by the next request."""
    eng = make_engine(ZERO_INIT, "shared:1", block_size=4, prefill_chunk=4)
    try:
        prompt = list(range(3, 30))
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        out = eng.generate_sync(EngineRequest(prompt, params, LoopParams(4)))
        scores = [lp for lp, _ in out[-1].prompt_scores]
        ref = torch.log_softmax(eng.model(torch.tensor([prompt]), 4)[0, :-1], -1)
        expected = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor(scores), expected, atol=1e-5)
        eng.generate_sync(EngineRequest(prompt, SamplingParams(max_tokens=1), LoopParams(4)))
        assert prefix_hit_tokens(eng.cache, 0) > 0
    finally:
        eng.stop()


@pytest.mark.parametrize(("policy", "depth"), [("per-loop", 12), ("per-loop", 1), ("shared:2", 9)])
def test_reported_capacity_is_what_the_pool_admits(policy: str, depth: int) -> None:
    eng = Engine(random_model(ZERO_INIT), EngineConfig(SchedulerConfig(), policy, 2 * 2**20))
    capacity = eng.capacity_tokens(depth)
    cache = eng.cache
    assert cache.ensure(cache.new_table(depth, b""), capacity + 1)
    assert not cache.ensure(cache.new_table(depth, b""), cache.block_size * 2**12)
    fresh = Engine(random_model(ZERO_INIT), EngineConfig(SchedulerConfig(), policy, 2 * 2**20))
    assert not fresh.cache.ensure(
        fresh.cache.new_table(depth, b""), capacity + 2 + cache.block_size
    )


def test_kl_exit_compares_successive_loops_not_a_loop_with_itself() -> None:
    """A tiny threshold must not stop tokens that still change between loops."""
    eng = make_engine(NOISY, "per-loop")
    try:
        params = SamplingParams(max_tokens=5, temperature=0, seed=2)
        out = eng.generate_sync(
            EngineRequest(PROMPT, params, LoopParams(6, RecurrenceExit("kl", 1e-12, 1)))
        )
        assert [o.depth for o in out] == [6] * 5
    finally:
        eng.stop()


def test_unseeded_greedy_decoding_and_scores_repeat_and_a_seed_changes_the_noise() -> None:
    eng = make_engine(NOISY)

    def run(seed: int | None) -> tuple[list[int], list[float]]:
        params = SamplingParams(max_tokens=6, temperature=0, seed=seed, prompt_logprobs=0)
        out = eng.generate_sync(EngineRequest(PROMPT, params, LoopParams(3)))
        scores = next(o.prompt_scores for o in out if o.prompt_scores is not None)
        return tokens(out), [s for s, _ in scores]

    try:
        first, again = run(None), run(None)
        assert first == again  # same tokens, bit-identical prompt scores
        assert run(12345)[1] != first[1]  # another noise stream scores differently
    finally:
        eng.stop()


def test_done_tokens_wait_for_a_shared_coda_only_when_another_can_finish_in_time() -> None:
    def group(depth: int, loop: int, exit: RecurrenceExit | None = None) -> SimpleNamespace:
        loops = SimpleNamespace(exit=exit)
        return SimpleNamespace(
            depth=depth, loop=loop, seq=SimpleNamespace(request=SimpleNamespace(loops=loops))
        )

    deep, near = group(8, 4), group(8, 6)
    adaptive = group(12, 3, RecurrenceExit("residual", 0.1))
    assert coda_ready(0, 2, [deep])  # a shallow request is not held for a deep one
    assert not coda_ready(0, 2, [deep, near])  # near finishes within the 2 loops: share
    nearer = group(8, 7)  # the same group a loop later
    assert not coda_ready(1, 2, [deep, nearer]) and coda_ready(2, 2, [deep, nearer])
    assert not coda_ready(0, 2, [adaptive]) and coda_ready(2, 2, [adaptive])  # may exit any loop
    assert coda_ready(0, 0, [adaptive, near])  # no wait
    assert not coda_ready(50, None, [deep])  # lockstep: the caller waits for every token


def test_pending_aborts_take_no_queue_room() -> None:
    """Clients that disconnect put aborts in the engine's inbox; until the engine drains them
    they must not count as waiting work (they did: a burst of disconnects answered new
    requests 429 for ~0.3 s)."""
    sched = SchedulerConfig(max_batch=2, max_queue=2, prefill_chunk=4)
    engine = Engine(random_model(ZERO_INIT), EngineConfig(sched, kv_cache_bytes=8 * 2**20))
    seqs = [engine.submit(greedy(2), lambda _: None) for _ in range(3)]
    assert engine.has_room() and not engine.has_room(2)  # 2 may run, 2 may wait
    engine._drain_inbox()  # the engine thread's step would do this (not started here)
    assert engine.has_room() and not engine.has_room(2)
    for seq in seqs:
        engine.abort(seq)
    assert engine.has_room() and not engine.has_room(2), "an abort took a place in the queue"
    engine._drain_inbox()
    assert engine.has_room(4)
    engine.stop()  # its output relay's thread
