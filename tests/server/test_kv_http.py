"""The KV policy over HTTP: exact by default on a checkpoint without a measured policy table,
the measured policy where it is within the bound (and /v1/models says which and why), prefix
reuse and preemption that never change a response, and preemptions counted in /metrics."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import httpx
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint
from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.server.engine.engine import Engine, EngineConfig
from parcae_serve.server.engine.kv_cache import token_bytes
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.scheduler import SchedulerConfig
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams
from tests.conftest import running_server
from tests.helpers import random_model, reference_cfg
from tests.model.reference import reference_forward
from tests.model.test_loading import write_released


def models_card(url: str) -> dict:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["recurrence"]


def complete(url: str, prompt: list[int], **body) -> tuple[list[int], list[float]]:
    body = {"prompt": prompt, "temperature": 0, "logprobs": 0, "ignore_eos": True,
            "return_tokens_as_token_ids": True, **body}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return [int(t.split(":")[1]) for t in lp["tokens"]], lp["token_logprobs"]


def reference_greedy(model, prompt: list[int], depth: int, n: int) -> list[int]:
    """The plain reference forward (tests/model/reference.py), h_0 from the server's default
    per-position noise stream."""
    sd, cfg = model.state_dict(), reference_cfg(model.cfg)
    ids, out, g = list(prompt), [], torch.Generator()
    for _ in range(n):
        h0 = []
        for p in range(len(ids)):
            g.manual_seed(p)  # the default noise seed 0: stream seed * stride + position
            h0.append(model.initial_state(1, 1, [g], torch.empty(0))[0, 0])
        logits = reference_forward(sd, cfg, torch.tensor(ids), depth, torch.stack(h0))
        out.append(int(logits[-1].argmax()))
        ids.append(out[-1])
    return out


def test_default_flags_serve_a_released_checkpoint_exactly(tmp_path: Path, tiny_model_dir) -> None:
    tok = Tokenizer.from_dir(tiny_model_dir)
    vocab = tok.vocab_size
    cfg = ParcaeConfig(n_embd=64, num_attention_heads=4, vocab_size=vocab, state_init="normal",
                       value_embed_layers=[0, 2, 3], mean_recurrence=3, block_size=256)  # fmt: skip
    model = random_model(cfg, seed=5)
    write_released(model, tmp_path)
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path)
    prompt = [(11 * i + 7) % vocab for i in range(40)]
    with running_server(tmp_path) as server:  # default KV flags
        card = models_card(server.url)
        assert card["kv_policy"] == "per-loop"
        assert "no measured" in card["kv_policy_reason"]
        got, _ = complete(server.url, prompt, max_tokens=12)
    assert got == reference_greedy(model, [tok.bos_id, *prompt], 3, 12)  # the server adds BOS


def test_auto_takes_a_measured_policy_within_the_bound(tmp_path: Path, tiny_model_dir) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    rows = [
        {"policy": p, "depth": d, "nll_cost": cost, "bytes_per_token": b}
        for p, cost, b in (("per-loop", 0.0, 900), ("first:2", 0.001, 400), ("shared:1", 0.03, 200))
        for d in (3, 6)
    ]
    (tmp_path / "m" / "calibration.json").write_text(json.dumps({"kv_policies": {"rows": rows}}))
    with running_server(tmp_path / "m") as server:
        card = models_card(server.url)
        assert (card["kv_policy"], card["kv_policy_max_depth"]) == ("first:2", 6)
        assert "+0.10%" in card["kv_policy_reason"]
    with running_server(tmp_path / "m", "--kv-max-nll-cost", "0.0005") as server:
        card = models_card(server.url)
        assert card["kv_policy"] == "per-loop" and "0.05%" in card["kv_policy_reason"]


def test_builtin_model_serves_its_calibrated_policy(builtin_server: str) -> None:
    table = json.loads((builtin_checkpoint() / "calibration.json").read_text())["kv_policies"]
    card = models_card(builtin_server)
    assert card["kv_policy"] == table["recommended"]["policy"] != "per-loop"
    assert card["kv_policy_max_depth"] == table["recommended"]["max_depth"]


def test_preemption_and_prefix_reuse_never_change_a_response(tiny_model_dir) -> None:
    cfg = load_checkpoint(tiny_model_dir).cfg
    outer, rec = token_bytes(cfg, torch.float32)
    bundle = 4 * (outer + 2 * rec)  # first:2 at the default depth 3: two slots per block of 4
    flags = ("--kv-policy", "first:2", "--block-size", "4", "--kv-cache-bytes", str(24 * bundle))
    prompts = [[(5 * i + j) % 300 + 3 for i in range(12)] for j in range(6)]
    with running_server(tiny_model_dir, *flags) as server:
        body = {"max_tokens": 34, "recurrence_depth": 4}
        alone = [complete(server.url, p, seed=j, **body) for j, p in enumerate(prompts)]
        assert re.search(
            r"^parcae_preemptions_total\{[^}]*\} 0\.0$",
            httpx.get(f"{server.url}/metrics").text,
            re.M,
        )
        together: dict[int, tuple] = {}

        def run(j: int) -> None:
            together[j] = complete(server.url, prompts[j], seed=j, **body)

        threads = [threading.Thread(target=run, args=(j,)) for j in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{server.url}/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("parcae_preemptions_total"))
        assert float(line.split()[-1]) > 0
        for j in range(6):
            assert together[j][0] == alone[j][0]
            assert torch.allclose(
                torch.tensor(together[j][1]), torch.tensor(alone[j][1]), atol=1e-4
            )
        # a prompt over the cache's capacity at its depth: the 400 names the cache, not the model
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [5] * 400, **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["message"].startswith("The KV cache holds at most")
        # a repeated 40-token prompt hits its cached prefix and answers the same
        long = [(7 * i + 1) % 300 + 3 for i in range(40)]
        cold = complete(server.url, long, max_tokens=8)
        hits = lambda: next(  # noqa: E731
            float(x.split()[-1])
            for x in httpx.get(f"{server.url}/metrics").text.splitlines()
            if x.startswith("parcae_prefix_cache_hits_total")
        )
        before = hits()
        warm = complete(server.url, long, max_tokens=8)
        assert hits() == before + len(long) // 4 * 4  # BOS + 40 tokens: whole blocks of 4
        assert warm[0] == cold[0]
        assert torch.allclose(torch.tensor(warm[1]), torch.tensor(cold[1]), atol=1e-4)


def test_fp8_kv_cache_serves_what_the_engine_decodes_over_fp8_pools(tiny_model_dir) -> None:
    """--kv-cache-dtype fp8: /v1/models says float8_e4m3fn, and a greedy completion is the
    in-process engine's over fp8 pools (same policy), token for token and logprob for logprob,
    which the fp32 cache's logprobs are not. (The server adds BOS; the engine is given it.)"""
    prompt = [(7 * i + 3) % 300 + 3 for i in range(30)]
    tok = Tokenizer.from_dir(tiny_model_dir)
    flags = ("--kv-policy", "per-loop", "--block-size", "4")
    with running_server(tiny_model_dir, *flags, "--kv-cache-dtype", "fp8") as server:
        assert models_card(server.url)["kv_cache_dtype"] == "float8_e4m3fn"
        got, got_lp = complete(server.url, prompt, max_tokens=10, recurrence_depth=4)
    sched = SchedulerConfig(max_batch=4)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=0, ignore_eos=True)
    request = EngineRequest([tok.bos_id, *prompt], params, LoopParams(4))
    outputs = {}
    for dtype in (torch.float8_e4m3fn, torch.float32):
        config = EngineConfig(sched, kv_policy="per-loop", block_size=4, kv_cache_dtype=dtype)
        engine = Engine(load_checkpoint(tiny_model_dir), config)
        engine.start()
        try:
            out = [o for o in engine.generate_sync(request) if o.token is not None]
        finally:
            engine.stop()
        outputs[dtype] = [o.token for o in out], [o.logprob for o in out]
    assert got == outputs[torch.float8_e4m3fn][0]
    served = torch.tensor(got_lp)
    assert torch.allclose(served, torch.tensor(outputs[torch.float8_e4m3fn][1]), atol=1e-5)
    assert not torch.allclose(served, torch.tensor(outputs[torch.float32][1]), atol=1e-5)
