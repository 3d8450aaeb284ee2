"""Self-speculative decoding: same greedy output as plain decoding, same sampling distribution,
exact K/V rollback, and the request/usage/metrics contract over HTTP."""

from __future__ import annotations

import random
from collections import Counter

import httpx
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, Speculation
from parcae_serve.server.engine.speculative import rejection_step
from tests.conftest import running_server
from tests.helpers import outputs_together
from tests.server.test_engine import NOISY, ZERO_INIT, greedy, make_engine, tokens

TINY_VOCAB = ParcaeConfig(
    n_embd=32, num_attention_heads=2, vocab_size=6, padding_multiple=8, value_embed_layers=[],
    n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1, mean_recurrence=3,
)  # fmt: skip


def random_prompts(n: int, seed: int, vocab: int = 100) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


@pytest.mark.parametrize(
    ("cfg", "compile_mode", "kv_dtype"),
    [
        (NOISY, "off", None),
        (ZERO_INIT, "off", None),
        (NOISY, "eager", None),
        (NOISY, "eager", torch.float16),
        (NOISY, "eager", torch.float8_e4m3fn),
    ],
)
def test_greedy_output_equals_plain_decoding_for_every_depth(cfg, compile_mode, kv_dtype) -> None:
    """Per-loop (exact) policy: every depth, draft depth and draft length, many prompts; with
    a half-precision or fp8 KV cache too (drafts and verification round K/V as the pool stores them)."""
    engine = make_engine(cfg, compile=compile_mode, block_size=8, kv_cache_dtype=kv_dtype)
    try:
        rng = random.Random(1)
        for i, prompt in enumerate(random_prompts(16, seed=hash(compile_mode) % 100)):
            depth = [2, 3, 4, 6][i % 4]
            spec = Speculation(rng.randrange(1, depth), rng.choice([2, 3, 5, 8]))
            plain = tokens(engine.generate_sync(greedy(depth, 17, prompt)))
            fast = engine.generate_sync(greedy(depth, 17, prompt, speculative=spec))
            assert tokens(fast) == plain, (depth, spec, prompt)
            assert all(o.depth == depth for o in fast if o.token is not None)
            assert fast[-1].draft_tokens >= fast[-1].accepted_tokens
        assert engine.metrics.draft_tokens._value.get() > 0
    finally:
        engine.stop()


def test_fused_greedy_drafts_equal_plain_decoding() -> None:
    """With the draft graphs warmed up, a greedy round drafts its k tokens in one call (the
    graphs' code, uncompiled here); the output is still plain decoding's."""
    engine = make_engine(NOISY, compile="eager", block_size=8)
    try:
        specs = [Speculation(1, 3), Speculation(2, 5)]
        for spec in specs:
            engine.compile_decode([3, 4], spec)
        calls = []
        draft = engine.runner.draft
        engine.runner.draft = lambda groups, depth: (
            calls.append(len(groups)) or draft(groups, depth)
        )
        for i, prompt in enumerate(random_prompts(8, seed=5)):
            depth, spec = 3 + i % 2, specs[i % 2]
            plain = tokens(engine.generate_sync(greedy(depth, 15, prompt)))
            fast = tokens(engine.generate_sync(greedy(depth, 15, prompt, speculative=spec)))
            assert fast == plain, (depth, spec, prompt)
        assert calls
    finally:
        engine.stop()


def test_speculative_logprobs_are_the_full_depth_ones() -> None:
    engine = make_engine(NOISY)
    try:

        def run(spec):
            params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
            request = EngineRequest([1, 4, 9, 16, 25], params, LoopParams(4, speculative=spec))
            return [o for o in engine.generate_sync(request) if o.token is not None]

        plain, fast = run(None), run(Speculation(1, 4))
        for a, b in zip(plain, fast, strict=True):
            assert a.token == b.token and b.depth == 4
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert [t for t, _ in b.top] == [t for t, _ in a.top]
    finally:
        engine.stop()


def test_rejected_drafts_give_their_blocks_back_and_leave_no_trace() -> None:
    """Rollback frees the blocks past the sequence's need; after the request the pool is back to
    where a plain request leaves it; a second request that reuses the prompt prefix sees the
    same cached prefix either way."""
    engine = make_engine(NOISY, block_size=4)
    cache = engine.cache
    try:
        prompt = list(range(5, 30))
        engine.generate_sync(greedy(4, 4, prompt))  # publishes the prompt's blocks
        free = (len(cache.free_outer), len(cache.free_rec))
        prefix = set(cache.prefix)
        spec = greedy(4, 24, prompt, speculative=Speculation(1, 8))
        seen = []
        original = engine.speculator.round

        def watched(seqs, ks):
            out = original(seqs, ks)
            seen.extend(len(s.table.bundles) * cache.block_size - s.computed for s in seqs)
            return out

        engine.speculator.round = watched
        out = engine.generate_sync(spec)
        assert tokens(out) == tokens(engine.generate_sync(greedy(4, 24, prompt)))
        assert seen and all(room <= cache.block_size for room in seen)  # nothing past need
        assert (len(cache.free_outer), len(cache.free_rec)) == free
        assert set(cache.prefix) == prefix
    finally:
        engine.stop()


def test_rejection_step_keeps_the_target_distribution() -> None:
    """Draft x ~ q, then one rejection step: the result is distributed as p (chi-square)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])
    n, counts = 20_000, Counter()
    draws = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    for x in draws:
        replacement = rejection_step(p, q, x, g)
        counts[x if replacement is None else replacement] += 1
    observed = [counts[i] for i in range(5)]
    assert chisquare(observed, (p * n).tolist()).pvalue > 1e-3
    # and it is not vacuous: the drafts alone are far from p
    drafted = Counter(draws)
    assert chisquare([drafted[i] for i in range(5)], (p * n).tolist()).pvalue < 1e-6


def test_speculative_sampling_matches_plain_sampling_on_a_small_vocabulary() -> None:
    """Three-token continuations sampled at T=3 with and without speculation (draft depth 1,
    two drafts: tokens 2 and 3 come from one round): the distributions of tokens 2-3 agree
    (chi-square homogeneity), while depth 1 alone differs."""
    engine = make_engine(TINY_VOCAB, max_batch=64)
    engine.scheduler.config.speculative_max_batch = 64  # speculate at any batch size
    try:

        def histogram(depth: int, spec: Speculation | None, n: int = 800) -> Counter:
            def request(seed: int) -> EngineRequest:  # seeded: the test is deterministic
                params = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True, seed=seed)
                return EngineRequest([1, 3, 2], params, LoopParams(depth, speculative=spec))

            counts = Counter()
            for start in range(0, n, 200):  # within the queue bound
                outs = outputs_together(engine, [request(start + i) for i in range(200)])
                counts.update(tuple(tokens(out)[1:]) for out in outs)
            return counts

        plain, fast = histogram(3, None), histogram(3, Speculation(1, 2))
        shallow = histogram(1, None)
        keys = sorted(set(plain) | set(fast) | set(shallow))
        same = chi2_contingency([[plain[k] + 1 for k in keys], [fast[k] + 1 for k in keys]])
        assert same.pvalue > 1e-3
        assert engine.metrics.draft_tokens._value.get() > 0
        differs = chi2_contingency([[plain[k] + 1 for k in keys], [shallow[k] + 1 for k in keys]])
        assert differs.pvalue < same.pvalue
    finally:
        engine.stop()


@pytest.mark.parametrize("max_batch", [0, 64])
def test_concurrent_requests_speculate_exactly_or_decode_plainly(max_batch: int) -> None:
    """Six requests at once, prefill chunks and decode rounds in the same steps: with the
    under-load switch at 0 running sequences they decode plainly, at 64 they all speculate
    (batched drafts and verifies); greedy output is plain decoding's either way."""
    engine = make_engine(NOISY)
    try:
        engine.scheduler.config.speculative_max_batch = max_batch
        prompts = random_prompts(6, seed=3)
        specs = [Speculation(1 + i % 2, 2 + i % 3) for i in range(6)]
        reqs = [greedy(3 + i % 2, 9, p, speculative=s)
                for i, (p, s) in enumerate(zip(prompts, specs, strict=True))]  # fmt: skip
        outs = outputs_together(engine, reqs)
        drafted = engine.metrics.draft_tokens._value.get()
        plain = [
            tokens(engine.generate_sync(greedy(3 + i % 2, 9, p))) for i, p in enumerate(prompts)
        ]
        assert [tokens(o) for o in outs] == plain
        assert (drafted > 0) == (max_batch == 64)
    finally:
        engine.stop()


@pytest.mark.parametrize("compile_mode", ["off", "eager"])
def test_different_depths_draft_together(compile_mode: str) -> None:
    """Requests of depths 4 and 6 with the same draft depth share a draft call (stepwise, or
    fused once warmed) though their tables hold different slot counts; output is plain's."""
    engine = make_engine(NOISY, compile=compile_mode)
    try:
        spec = Speculation(1, 3)
        engine.compile_decode([4, 6], spec)
        engine.scheduler.config.speculative_max_batch = 64
        prompts = random_prompts(4, seed=7)
        reqs = [greedy(4 + 2 * (i % 2), 10, p, speculative=spec) for i, p in enumerate(prompts)]
        outs = outputs_together(engine, reqs)
        plain = [tokens(engine.generate_sync(greedy(4 + 2 * (i % 2), 10, p)))
                 for i, p in enumerate(prompts)]  # fmt: skip
        assert [tokens(o) for o in outs] == plain
        assert all(o[-1].error is None for o in outs)
    finally:
        engine.stop()


def test_seeded_sampling_repeats_whatever_else_runs() -> None:
    """The under-load switch leaves sampled rows speculating: a seeded request gives the same
    tokens alone and next to another sequence."""
    engine = make_engine(NOISY)
    try:
        params = SamplingParams(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True)
        request = EngineRequest(
            [3, 1, 4, 1, 5], params, LoopParams(4, speculative=Speculation(2, 3))
        )
        alone = tokens(engine.generate_sync(request))
        busy = outputs_together(engine, [request, greedy(3, 40, [9, 9])])
        assert tokens(busy[0]) == alone
        assert busy[0][-1].draft_tokens > 0
    finally:
        engine.stop()


# Over HTTP --------------------------------------------------------------------------------------
def complete(url: str, **body) -> httpx.Response:
    body = {"prompt": "def f(x):", "max_tokens": 12, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir):
    with running_server(tiny_model_dir, "--speculative", "1:3") as server:
        yield server


def test_http_speculation_reports_usage_and_metrics(spec_server) -> None:
    url = spec_server.url
    plain = complete(url, recurrence_depth=4, recurrence_speculative=False).json()
    assert plain["usage"]["recurrence"].get("speculative") is None
    fast = complete(url, recurrence_depth=4, recurrence_speculative={"draft_depth": 2, "tokens": 4})
    body = fast.json()
    assert fast.status_code == 200 and body["choices"][0]["text"] == plain["choices"][0]["text"]
    usage = body["usage"]["recurrence"]
    assert usage["mean_depth"] == 4
    spec = usage["speculative"]
    assert spec["draft_tokens"] >= spec["accepted_tokens"] >= 0 and spec["draft_tokens"] > 0
    assert spec["acceptance_rate"] == pytest.approx(
        spec["accepted_tokens"] / spec["draft_tokens"], abs=1e-4
    )
    # the server default (--speculative 1:3) applies to a plain request at depth >= 2
    default = complete(url, recurrence_depth=3).json()["usage"]["recurrence"]
    assert default["speculative"]["draft_tokens"] > 0
    metrics = httpx.get(f"{url}/metrics").text
    assert "parcae_spec_decode_draft_tokens_total" in metrics
    assert "parcae_spec_decode_acceptance_rate" in metrics


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"recurrence_depth": 3, "recurrence_speculative": {"draft_depth": 3, "tokens": 2}},
         "recurrence_speculative.draft_depth"),
        ({"recurrence_speculative": {"draft_depth": 0, "tokens": 2}},
         "recurrence_speculative.draft_depth"),
        ({"recurrence_speculative": {"draft_depth": 1, "tokens": 1}}, None),
        ({"recurrence_speculative": {"draft_depth": 1, "tokens": 17}}, None),
        ({"recurrence_speculative": {"draft_depth": 1}}, None),
        ({"recurrence_speculative": {"draft_depth": 1, "tokens": 2, "x": 1}}, None),
        ({"recurrence_speculative": True}, None),
        ({"recurrence_depth": 4, "recurrence_speculative": {"draft_depth": 1, "tokens": 2},
          "recurrence_exit": {"criterion": "residual", "threshold": 0.1}},
         "recurrence_speculative"),
        ({"recurrence_depth": 4, "recurrence_speculative": {"draft_depth": 1, "tokens": 2},
          "recurrence_warm_start": True}, "recurrence_speculative"),
        ({"recurrence_speculative": {"draft_depth": 1, "tokens": 2},
          "recurrence_exit": {"criterion": "auto", "max_nll_cost": 0.01}},
         "recurrence_speculative"),
    ],
)  # fmt: skip
def test_http_bad_speculation_is_a_400(spec_server, fields: dict, param: str | None) -> None:
    r = complete(spec_server.url, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert httpx.get(f"{spec_server.url}/health").status_code == 200


def test_http_server_default_steps_aside_where_it_cannot_apply(spec_server) -> None:
    """--speculative 1:3 does not touch depth-1 requests, exit rules, warm starts, sampling or
    a lossy KV layout (an explicit recurrence_speculative still samples speculatively)."""
    url = spec_server.url
    for fields in (
        {"recurrence_depth": 1},
        {"recurrence_depth": 4, "temperature": 0.7, "seed": 3},
        {"recurrence_depth": 4, "kv_policy": "shared:1"},  # lossy: the output would change
        {"recurrence_depth": 4, "recurrence_exit": {"criterion": "residual", "threshold": 0.1}},
        {"recurrence_depth": 4, "recurrence_warm_start": True},
    ):
        r = complete(url, **fields)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["recurrence"].get("speculative") is None
    sampled = complete(url, recurrence_depth=4, temperature=0.7, seed=3,
                       recurrence_speculative={"draft_depth": 1, "tokens": 3})  # fmt: skip
    assert sampled.json()["usage"]["recurrence"]["speculative"]["draft_tokens"] > 0
