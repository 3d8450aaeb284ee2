"""KV-cache policies: quality, memory, capacity and speed; and prefix reuse's TTFT.

    python bench/kv_policies.py [--model DIR] [--out bench/out/kv_policies.json]

For each loop-slot policy, on held-out stdlib code (files the built-in model never saw):
teacher-forced NLL decoding through the cache (not prefill) at T = mu_rec and 2*mu_rec, cache
bytes per token, how many 1k-token sequences the allocator admits in a fixed budget, and decode
tokens/s. Then a live server answers the same long prompt twice: the second finds its prefix
cached, and the TTFT drop is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint  # noqa: E402
from parcae_serve.model.tokenizer import Tokenizer  # noqa: E402
from parcae_serve.server.calibration.calibrate import heldout_sequences  # noqa: E402
from parcae_serve.server.calibration.evaluation import teacher_forced_nll  # noqa: E402
from parcae_serve.server.engine.kv_cache import KVCache, LoopSlotPolicy  # noqa: E402
from tests.conftest import running_server  # noqa: E402

POLICIES = ["per-loop", "shared:1", "shared:2", "first:2", "last:2"]
BUDGET = 256 * 2**20


def sequences_that_fit(model, policy: str, depth: int, tokens: int = 1024) -> int:
    """Admit 1k-token sequences into a BUDGET-byte pool until the allocator says no."""
    cache = KVCache(model.cfg, LoopSlotPolicy.parse(policy), BUDGET, typical_depth=depth)
    count = 0
    while cache.ensure(cache.new_table(depth, b""), tokens):
        count += 1
    return count


def prefix_ttft(model_dir: Path, tokenizer: Tokenizer, prompt_tokens: int) -> dict:
    text = " ".join(f"value_{i} = compute({i})" for i in range(prompt_tokens))
    ids = tokenizer.encode(text)[:prompt_tokens]
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "seed": 1}
    # prefixes are reused exactly under every policy: prompts keep every loop while prefilling
    flags = ("--kv-cache-bytes", str(BUDGET))
    with running_server(model_dir, *flags, threads=None) as server:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)
            r.raise_for_status()
            times.append(time.perf_counter() - start)
        hits = httpx.get(f"{server.url}/metrics").text
    hit_line = next(x for x in hits.splitlines() if x.startswith("parcae_prefix_cache_hits_total"))
    return {
        "prompt_tokens": len(ids),
        "cold_ms": times[0] * 1e3,
        "warm_ms": min(times[1:]) * 1e3,
        "hits": float(hit_line.split()[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/kv_policies.json")
    args = parser.parse_args()
    model_dir = args.model or builtin_checkpoint()
    torch.manual_seed(0)
    model = load_checkpoint(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    data = heldout_sequences(tokenizer, args.sequences, args.length)
    mu = model.cfg.mean_recurrence
    rows = []
    for policy in POLICIES:
        for depth in (mu, 2 * mu):
            q = asdict(teacher_forced_nll(model, data, depth, policy))
            q.update(policy=policy, depth=depth, seqs_1k=sequences_that_fit(model, policy, depth))
            rows.append(q)
            bytes_per_token = q["cache_bytes_per_token"]
            print(
                f"{policy:9s} T={depth:2d} nll {q['nll']:.4f} {bytes_per_token:.0f} B/tok "
                f"{q['seqs_1k']} seqs {q['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
    report = {
        "command": " ".join(sys.argv),
        "model": model_dir.name,
        "budget_bytes": BUDGET,
        "heldout_tokens": sum(len(s) - 1 for s in data),
        "policies": rows,
        "prefix_reuse": prefix_ttft(model_dir, tokenizer, 1000),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["prefix_reuse"]))


if __name__ == "__main__":
    main()
