"""Chunked prefill and prefix reuse under the default KV policy, on a live server.

    python bench/kv_prefill.py [--model DIR] [--out bench/out/kv_prefill.json] [-- SERVER FLAGS]

1. Stall: 8 streams decode (greedy, 160 tokens each) while a 900-token prompt arrives; the
   worst gap between two tokens of any stream while that prompt is prefilled, with the prompt
   prefilled in chunks (`--prefill-chunk 256`, the default) and in one chunk
   (`--prefill-chunk 4096`, what a lossy policy did before prefill kept every loop).
2. Prefix reuse: the same 900-token prompt three times (max_tokens 1): cold TTFT, then the
   best warm TTFT, when its prefix blocks are cached.
Both on the built-in model at default flags unless flags follow `--`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parcae_serve.model.loading import builtin_checkpoint  # noqa: E402
from parcae_serve.model.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import running_server  # noqa: E402

STREAMS, STREAM_TOKENS, LONG = 8, 160, 900


def long_prompt(tokenizer: Tokenizer, salt: int) -> list[int]:
    text = " ".join(f"value_{salt}_{i} = compute({i})" for i in range(LONG))
    return tokenizer.encode(text)[:LONG]


def stream_times(url: str, prompt: list[int], seed: int, out: list[float]) -> None:
    body = {"prompt": prompt, "max_tokens": STREAM_TOKENS, "temperature": 0, "seed": seed,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                out.append(time.perf_counter())


def post(url: str, prompt: list[int]) -> float:
    start = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - start


def worst_gap(url: str, tokenizer: Tokenizer) -> dict:
    """Worst inter-token gap of the running streams while the long prompt is prefilled."""
    times: list[list[float]] = [[] for _ in range(STREAMS)]
    threads = [
        threading.Thread(target=stream_times, args=(url, [3 + i, 5, 7, 9], i, times[i]))
        for i in range(STREAMS)
    ]
    for t in threads:
        t.start()
    while min(len(t) for t in times) < 20:  # every stream is decoding
        time.sleep(0.01)
    sent = time.perf_counter()
    ttft = post(url, long_prompt(tokenizer, int(sent)))
    done = sent + ttft
    for t in threads:
        t.join()
    gaps = [b - a for ts in times for a, b in pairwise(ts) if b > sent and a < done]
    steady = [b - a for ts in times for a, b in pairwise(ts[1:20])]
    return {
        "long_prompt_ttft_ms": ttft * 1e3,
        "worst_gap_ms": max(gaps) * 1e3,
        "median_gap_before_ms": sorted(steady)[len(steady) // 2] * 1e3,
    }


def prefix_ttft(url: str, tokenizer: Tokenizer) -> dict:
    prompt = long_prompt(tokenizer, 0)
    times = [post(url, prompt) for _ in range(3)]
    hits = httpx.get(f"{url}/metrics").text
    line = next(x for x in hits.splitlines() if x.startswith("parcae_prefix_cache_hits_total"))
    return {"cold_ms": times[0] * 1e3, "warm_ms": min(times[1:]) * 1e3,
            "hits": float(line.split()[-1])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/kv_prefill.json")
    parser.add_argument("flags", nargs="*", help="extra server flags (after --)")
    args = parser.parse_args()
    model_dir = args.model or builtin_checkpoint()
    tokenizer = Tokenizer.from_dir(model_dir)
    common = ("--compile", "auto", "--max-batch", "16", *args.flags)
    report: dict = {"command": " ".join(sys.argv), "machine": platform.processor() or
                    platform.machine(), "threads": torch.get_num_threads(), "stall": {}}  # fmt: skip
    for name, chunk in (("chunked", "256"), ("one_chunk", "4096")):
        with running_server(
            model_dir, *common, "--prefill-chunk", chunk, timeout=600, threads=None
        ) as s:
            report["policy"] = httpx.get(f"{s.url}/v1/models").json()["data"][0]["recurrence"]
            report["stall"][name] = worst_gap(s.url, tokenizer)
            print(name, json.dumps(report["stall"][name]), flush=True)
            if name == "chunked":
                report["prefix_reuse"] = prefix_ttft(s.url, tokenizer)
                print("prefix", json.dumps(report["prefix_reuse"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
