"""Decode attention on the CPU: the hand-written paged kernel against inductor's own attention,
inside the built-in model's compiled decode graph.

    python bench/decode_attention.py [--rounds 4] [--threads N] [--depth 6]
                                     [--kv-cache-dtype float32|float16|bfloat16|fp8]
                                     [--out bench/out/decode_attention.json]

One process, one engine, both variants compiled (CompiledDecoder.fused toggled),
then for a batch of 1 and of 32 rows at 64, 256 and 900 positions of context: the median time
of one graph call (one decode token per row, all loops), A and B interleaved `--rounds` times. Rows of a
batch have different lengths (L down to L/2), as in serving; K/V rows are real pool rows.
Everything runs in this thread (a second thread with its own OpenMP pool would slow both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from parcae_serve.server.api.openmp import spin_briefly_when_idle

spin_briefly_when_idle()  # as the server does, before torch loads OpenMP

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fast_engine import cpu_name  # noqa: E402
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint  # noqa: E402
from parcae_serve.server.api.app import KV_CACHE_DTYPES  # noqa: E402
from parcae_serve.server.engine.decode_graph import DecodeBatch, KeyTensors  # noqa: E402
from parcae_serve.server.engine.engine import Engine, EngineConfig  # noqa: E402
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy  # noqa: E402
from parcae_serve.server.engine.scheduler import SchedulerConfig  # noqa: E402

CONTEXTS = (64, 256, 900)
BATCHES = (1, 32)


def batch(B: int, L: int, depth: int, d_rec: int, block: int = 1024) -> DecodeBatch:
    """B rows, row i with L - (7 i mod L/2) past positions in its own run of pool rows (and
    one row more: where its new token's K/V are written)."""
    rows = torch.stack([torch.arange(L + 1) + i * block for i in range(B)])
    lengths = torch.tensor([L - (i * 7) % (L // 2) for i in range(B)])
    ids = torch.ones(B, 1, dtype=torch.long)
    return DecodeBatch(ids, lengths[:, None], torch.zeros(B, 1, d_rec), lengths, rows,
                       torch.stack([rows, rows]), torch.zeros(depth, dtype=torch.long),
                       torch.full((B,), depth))  # fmt: skip


def call_ms(decoder, depth: int, b: DecodeBatch, calls: int) -> float:
    key = KeyTensors.build(decoder.cache, (0,) * depth)  # the shared:1 policy's one slot
    for _ in range(2):
        decoder(depth, b, key)
    start = time.perf_counter()
    for _ in range(calls):
        decoder(depth, b, key)
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--kv-cache-dtype", choices=sorted(KV_CACHE_DTYPES), default="float32",
                        help="how the pools store K/V (the server's --kv-cache-dtype)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/decode_attention.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(builtin_checkpoint())
    sched = SchedulerConfig(max_batch=64, max_queue=64, prefill_chunk=512, max_context=2048)
    config = EngineConfig(sched, kv_policy=LoopSlotPolicy.parse("shared:1"),
                          kv_cache_bytes=512 * 2**20, compile="inductor", threads=args.threads,
                          kv_cache_dtype=KV_CACHE_DTYPES[args.kv_cache_dtype])  # fmt: skip
    engine = Engine(model, config)
    decoder = engine.runner.decoder
    if not decoder.fused:
        sys.exit("the CPU kernel is not available here (see cpu_kernels.available)")
    for fused in (False, True):  # compile both variants, the kernel's for one row too
        decoder.fused = fused
        decoder.ready.discard(args.depth)
        engine.compile_decode([args.depth])
    times: dict[tuple[bool, int, int], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for B in BATCHES:
                for L in CONTEXTS:
                    b = batch(B, L, args.depth, model.cfg.d_rec)
                    for fused in (False, True):
                        decoder.fused = fused
                        times.setdefault((fused, B, L), []).append(
                            call_ms(decoder, args.depth, b, 40 if B == 1 else 8)
                        )
    rows = []
    for B in BATCHES:
        for L in CONTEXTS:
            torch_ms = statistics.median(times[(False, B, L)])
            kernel_ms = statistics.median(times[(True, B, L)])
            rows.append({"batch": B, "context": L, "torch_ms": torch_ms, "kernel_ms": kernel_ms,
                         "speedup": torch_ms / kernel_ms})  # fmt: skip
    report = {"command": " ".join(sys.argv), "cpu": cpu_name(), "threads": args.threads,
              "depth": args.depth, "kv_cache_dtype": args.kv_cache_dtype, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['cpu']}, {args.threads} threads, T={args.depth}, K/V {args.kv_cache_dtype}, "
          "ms per graph call (median)")  # fmt: skip
    print("| rows | context | inductor attention | kernel | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['torch_ms']:.2f} | {r['kernel_ms']:.2f} | "
              f"{r['speedup']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
