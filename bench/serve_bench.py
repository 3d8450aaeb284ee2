"""Serving benchmark: one stream, N concurrent mixed-depth streams, TTFT/TPOT, cost per depth.

    python bench/serve_bench.py [--model DIR] [--concurrency 32] [--out bench/out/serve.json]

Without --model it builds the issue's reference shape (random weights: speed does not depend on
them): d=128, P/R/C = 2/2/2, vocab 512, T = 8, greedy, 16-token prompt, 64 new tokens. The
baseline, in the same run on the same machine, is a naive generate(): the whole sequence through
the model again for every token, no cache (what a looped model's reference loop costs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parcae_serve.model.config import ParcaeConfig  # noqa: E402
from parcae_serve.model.loading import load_checkpoint  # noqa: E402
from tests.conftest import running_server  # noqa: E402
from tests.helpers import random_model  # noqa: E402

PROMPT = list(range(3, 19))  # 16 token ids


def reference_checkpoint(directory: Path) -> Path:
    from parcae_serve.model.loading import save_checkpoint
    from parcae_serve.model.train import read_texts, stdlib_files, train_tokenizer

    tok = train_tokenizer(read_texts(stdlib_files()[:30]), 512)
    tok.save(str(directory / "tokenizer.json"))
    cfg = ParcaeConfig(n_embd=128, num_attention_heads=4, vocab_size=512, n_layers_in_prelude=2,
                       n_layers_in_recurrent_block=2, n_layers_in_coda=2, mean_recurrence=8,
                       value_embed_layers=list(range(6)), block_size=2048)  # fmt: skip
    save_checkpoint(random_model(cfg), directory)
    return directory


def naive_tokens_per_s(model_dir: Path, depth: int, new_tokens: int) -> float:
    model = load_checkpoint(model_dir)
    ids = torch.tensor([PROMPT])
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens):
            nxt = model(ids, depth)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return new_tokens / (time.perf_counter() - start)


async def one_stream(
    http: httpx.AsyncClient, depth: int, new_tokens: int, prompt: list[int] = PROMPT
) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "recurrence_depth": depth,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    usage = {}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    n = usage["completion_tokens"]
    return {"depth": depth, "tokens": n, "e2e": end - start, "ttft": first - start,
            "tpot": (end - first) / max(1, n - 1)}  # fmt: skip


async def run_streams(
    url: str, depths: list[int], new_tokens: int, prompt: list[int] = PROMPT
) -> tuple[list[dict], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, d, new_tokens, prompt) for d in depths))
        return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--mixed-depths", default="4,8,12")
    parser.add_argument("--kv-policy", default="shared:1")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/serve.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model_dir = args.model or reference_checkpoint(tmp)
    report: dict = {"command": " ".join(sys.argv), "machine": machine(), "model": str(model_dir)}

    report["naive_tokens_per_s"] = naive_tokens_per_s(model_dir, args.depth, args.new_tokens)
    flags = ("--kv-policy", args.kv_policy, "--max-batch", str(max(64, args.concurrency)),
             "--kv-cache-bytes", str(512 * 2**20))  # fmt: skip
    with running_server(model_dir, *flags, threads=None) as server:
        url = server.url
        asyncio.run(run_streams(url, [args.depth], 8))  # warm-up
        singles = [
            asyncio.run(run_streams(url, [args.depth], args.new_tokens))[0][0] for _ in range(3)
        ]
        report["single"] = {
            "tokens_per_s": statistics.median(s["tokens"] / s["e2e"] for s in singles),
            "ttft_ms": statistics.median(s["ttft"] for s in singles) * 1e3,
            "tpot_ms": statistics.median(s["tpot"] for s in singles) * 1e3,
        }
        mixed = [int(d) for d in args.mixed_depths.split(",")]
        depths = [mixed[i % len(mixed)] for i in range(args.concurrency)]
        results, wall = asyncio.run(run_streams(url, depths, args.new_tokens))
        report["concurrent"] = {
            "streams": args.concurrency,
            "depths": args.mixed_depths,
            "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_ms_p50": pct([r["ttft"] for r in results], 0.5) * 1e3,
            "ttft_ms_p99": pct([r["ttft"] for r in results], 0.99) * 1e3,
            "tpot_ms_p50": pct([r["tpot"] for r in results], 0.5) * 1e3,
            "tpot_ms_p99": pct([r["tpot"] for r in results], 0.99) * 1e3,
        }
        per_depth = {}
        for d in (1, 2, 4, 8, 16, 32):
            r = asyncio.run(run_streams(url, [d], args.new_tokens))[0][0]
            per_depth[d] = r["tokens"] / r["e2e"]
        report["single_by_depth_tokens_per_s"] = per_depth
    s, c = report["single"], report["concurrent"]
    report["ratios"] = {
        "single_vs_naive": s["tokens_per_s"] / report["naive_tokens_per_s"],
        "concurrent_vs_single": c["aggregate_tokens_per_s"] / s["tokens_per_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def render(r: dict) -> str:
    s, c = r["single"], r["concurrent"]
    lines = [
        f"command: `{r['command']}`  machine: {r['machine']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| naive generate (no cache), T=8 | {r['naive_tokens_per_s']:.1f} tok/s |",
        f"| one stream over HTTP, T=8 | {s['tokens_per_s']:.1f} tok/s "
        f"(TTFT {s['ttft_ms']:.1f} ms, TPOT {s['tpot_ms']:.2f} ms) |",
        f"| {c['streams']} concurrent streams, depths {c['depths']} | "
        f"{c['aggregate_tokens_per_s']:.1f} tok/s aggregate |",
        f"| concurrent TTFT p50 / p99 | {c['ttft_ms_p50']:.0f} / {c['ttft_ms_p99']:.0f} ms |",
        f"| concurrent TPOT p50 / p99 | {c['tpot_ms_p50']:.1f} / {c['tpot_ms_p99']:.1f} ms |",
        f"| one stream vs naive | {r['ratios']['single_vs_naive']:.1f}x |",
        f"| concurrent vs one stream | {r['ratios']['concurrent_vs_single']:.1f}x |",
        "",
        "| depth T | " + " | ".join(str(d) for d in r["single_by_depth_tokens_per_s"]) + " |",
        "|---|" + "---|" * len(r["single_by_depth_tokens_per_s"]),
        "| tok/s (one stream) | "
        + " | ".join(f"{v:.0f}" for v in r["single_by_depth_tokens_per_s"].values())
        + " |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
