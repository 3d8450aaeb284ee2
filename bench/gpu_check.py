"""One command for a lent GPU: bf16 against fp32, then the serving benchmarks, one table.

    python bench/gpu_check.py                       # CUDA, 370m-shaped random model
    python bench/gpu_check.py --device cpu --shape tiny --compile off   # what CI runs

1. Numerics: the same random model in fp32 and in bf16 (weights and KV cache) scores a
   64-token sequence through the plain forward; bf16 log-probabilities must lie within
   `BF16_TOLERANCE` nats of fp32 (bf16 keeps 8 bits of mantissa: ~0.4% per rounding, and
   softmax outputs of a random model are flat, so errors stay small in log space).
2. Serving: the server on 127.0.0.1 with the chosen `--compile` (default auto: CUDA graphs on
   CUDA), one greedy stream at T=8 (TTFT, TPOT, tok/s) and 32 concurrent streams of depths
   4/8/12 (aggregate tok/s).
3. Speculation: the same server also serves self-speculative decoding (`--speculative 2:4`,
   compiled at start-up): one greedy stream at T=8 with and without it (tok/s each) and whether
   the two texts are equal.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import run_streams  # noqa: E402
from parcae_serve.model.config import ParcaeConfig  # noqa: E402
from parcae_serve.model.loading import builtin_checkpoint, save_checkpoint  # noqa: E402
from tests.conftest import running_server  # noqa: E402
from tests.helpers import random_model  # noqa: E402

BF16_TOLERANCE = 0.15  # nats, max |logprob_bf16 - logprob_fp32| over the scored tokens
SHAPES = {
    "370m": dict(block_size=2048, vocab_size=32768, n_embd=1024, num_attention_heads=8,
                 intermediate_size=4096, n_layers_in_prelude=4, n_layers_in_recurrent_block=4,
                 n_layers_in_coda=4, mean_recurrence=8, value_embed_layers=[0, 1, 4, 7, 10, 11]),
    "tiny": dict(vocab_size=4096, n_embd=64, num_attention_heads=4, mean_recurrence=8,
                 block_size=512),
}  # fmt: skip


def numerics(cfg: ParcaeConfig, device: str) -> dict:
    """Max |Δ logprob| of bf16 against fp32 on one 64-token sequence at T=8."""
    model = random_model(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731  (same h_0 for both)
    with torch.inference_mode():
        ref = torch.log_softmax(model(ids, 8, gen()).float(), -1)
        low = torch.log_softmax(model.to(torch.bfloat16)(ids, 8, gen()).float(), -1)
    err = (low - ref).abs().max().item()
    return {"max_abs_logprob_diff": err, "tolerance": BF16_TOLERANCE, "ok": err < BF16_TOLERANCE}


def serving(model_dir: Path, device: str, compile_mode: str, streams: int) -> dict:
    flags = ("--device", device, "--compile", compile_mode, "--compile-depths", "4,8,12",
             "--max-batch", str(max(streams, 1)), "--speculative", "2:4")  # fmt: skip
    with running_server(model_dir, *flags, timeout=1800) as server:
        spec = speculation(server.url)
        asyncio.run(run_streams(server.url, [8], 4))  # warm-up
        singles = [asyncio.run(run_streams(server.url, [8], 64))[0][0] for _ in range(3)]
        depths = [(4, 8, 12)[i % 3] for i in range(streams)]
        start = time.perf_counter()
        results, wall = asyncio.run(run_streams(server.url, depths, 64))
    return {
        "one_stream_tps": statistics.median(s["tokens"] / s["e2e"] for s in singles),
        "ttft_ms": statistics.median(s["ttft"] for s in singles) * 1e3,
        "tpot_ms": statistics.median(s["tpot"] for s in singles) * 1e3,
        "streams": streams,
        "streams_tps": sum(r["tokens"] for r in results) / wall,
        "wall_s": time.perf_counter() - start,
        **spec,
    }


def speculation(url: str, tokens: int = 64) -> dict:
    """One greedy stream at T=8 without and with speculation (the server's 2:4): tok/s, and
    whether the texts are equal (they must be under the exact policy; lossy ones may differ)."""
    out = {}
    for name, spec in (("plain", False), ("speculative", None)):  # None: the server's default
        body = {"prompt": "def f(x):", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "recurrence_depth": 8, "recurrence_speculative": spec}  # fmt: skip
        httpx.post(f"{url}/v1/completions", json=body, timeout=600)  # warm-up
        start = time.perf_counter()
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
        out[f"{name}_tps"] = tokens / (time.perf_counter() - start)
        out[f"{name}_text"] = reply["choices"][0]["text"]
        out[f"{name}_usage"] = reply["usage"]["recurrence"]
    out["speculative_same_text"] = out["plain_text"] == out["speculative_text"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="370m", choices=sorted(SHAPES))
    parser.add_argument("--compile", default="auto", help="the server's --compile")
    parser.add_argument("--streams", type=int, default=32)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu", file=sys.stderr)
        return 2
    cfg = ParcaeConfig(**SHAPES[args.shape])
    model_dir = Path(tempfile.mkdtemp()) / f"parcae-{args.shape}-random"
    save_checkpoint(random_model(cfg), model_dir)
    (model_dir / "tokenizer.json").write_bytes(
        (builtin_checkpoint() / "tokenizer.json").read_bytes()
    )
    num = numerics(cfg, args.device)
    srv = serving(model_dir, args.device, args.compile, args.streams)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    rows = [
        ("device", f"{name}, torch {torch.__version__}"),
        ("model", f"{args.shape}-shaped, random weights, `--compile {args.compile}`"),
        ("bf16 vs fp32: max abs Δ logprob", f"{num['max_abs_logprob_diff']:.4f} (tolerance {BF16_TOLERANCE}: {'ok' if num['ok'] else 'FAIL'})"),
        ("one stream, T=8: tok/s", f"{srv['one_stream_tps']:.1f}"),
        ("one stream: TTFT / TPOT", f"{srv['ttft_ms']:.1f} ms / {srv['tpot_ms']:.2f} ms"),
        (f"{srv['streams']} streams, depths 4/8/12: tok/s", f"{srv['streams_tps']:.1f}"),
        ("one stream, T=8, speculative 2:4 / plain: tok/s", f"{srv['speculative_tps']:.1f} / {srv['plain_tps']:.1f} (same text: {srv['speculative_same_text']}, acceptance {srv['speculative_usage']['speculative']['acceptance_rate']:.0%})"),
    ]  # fmt: skip
    print(f"command: `python bench/gpu_check.py {' '.join(argv or sys.argv[1:])}`")
    print("| check | value |\n|---|---|")
    print("\n".join(f"| {a} | {b} |" for a, b in rows))
    return 0 if num["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
