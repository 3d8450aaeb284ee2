"""The CPU decode-attention kernel alone, two versions of its source A/B: a git revision's
csrc/decode_attention.cpp (the baseline) against the working tree's.

    python bench/attention_kernel.py [--baseline HEAD~1] [--rounds 9] [--threads 1]
                                     [--dtypes fp8,float16,bfloat16,float32]
                                     [--contexts 900,64] [--layers 4]
                                     [--out bench/out/attention_kernel.json]

Both sources are built with the server's compile command (cpu_kernels), each registered under
its own operator namespace, and called alternately in one process, `--rounds` times: per call
the median time of one decode row attending to its past (the built-in model's heads, 4 x 64)
over `--layers` layers' pools in turn, as the `shared:1` policy reads them within a token (the
rows of a paged pool in blocks of 16 at random places). What it leaves out: the decode graph
around the kernel, and the weights that pass through the caches between its calls
(bench/decode_attention.py measures the kernel inside the graph).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fast_engine import cpu_name  # noqa: E402
from parcae_serve.server.api.app import KV_CACHE_DTYPES  # noqa: E402
from parcae_serve.server.engine import cpu_kernels  # noqa: E402

H, D, BLOCK, POOL_ROWS = 4, 64, 16, 8192


def build(source: str, namespace: str, workdir: Path) -> object:
    """`source` compiled and loaded as torch.ops.<namespace>.decode_attention."""
    for lib in ("TORCH_LIBRARY(", "TORCH_LIBRARY_IMPL("):
        source = source.replace(f"{lib}parcae,", f"{lib}{namespace},")
    src, lib_path = workdir / f"{namespace}.cpp", workdir / f"{namespace}.so"
    src.write_text(source)
    subprocess.run(cpu_kernels._command(src, lib_path), check=True, capture_output=True)
    torch.ops.load_library(str(lib_path))
    return getattr(torch.ops, namespace).decode_attention


def layer_inputs(dtype: torch.dtype, context: int, gen: torch.Generator) -> tuple:
    """One layer's pools and one row's query, own K/V and pool rows (blocks at random places)."""
    pools = [torch.randn(POOL_ROWS, H, D, generator=gen).to(dtype) for _ in range(2)]
    blocks = torch.randperm(POOL_ROWS // BLOCK, generator=gen)[: context // BLOCK + 2]
    rows = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[: context + 1][None]
    q = torch.randn(1, H, D, generator=gen)
    own = [torch.randn(1, H, D, generator=gen).to(dtype) for _ in range(2)]
    return (q, *own, *pools, rows, torch.tensor([context]), D**-0.5)


def call_us(op, layers: list[tuple], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        for args in layers:
            op(*args)
    return (time.perf_counter() - start) / (calls * len(layers)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline", default="HEAD~1", help="git revision of the baseline")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="fp8,float16,bfloat16,float32")
    parser.add_argument("--contexts", default="900,64")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/attention_kernel.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = cpu_kernels.SOURCE.relative_to(ROOT)
    baseline = subprocess.run(["git", "show", f"{args.baseline}:{path}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ops = {"baseline": build(baseline, "bench_a", Path(tmp)),
               "working tree": build(cpu_kernels.SOURCE.read_text(), "bench_b", Path(tmp))}  # fmt: skip
    rows = []
    gen = torch.Generator().manual_seed(0)
    for context in map(int, args.contexts.split(",")):
        for name in args.dtypes.split(","):
            layers = [layer_inputs(KV_CACHE_DTYPES[name], context, gen) for _ in range(args.layers)]
            a, b = (op(*layers[0]) for op in ops.values())
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), "the two versions disagree"
            times: dict[str, list[float]] = {k: [] for k in ops}
            calls = max(20, 30_000 // (context * args.layers))
            for _ in range(args.rounds):
                for key, op in ops.items():
                    times[key].append(call_us(op, layers, calls))
            base, new = (statistics.median(times[k]) for k in ops)
            rows.append({"context": context, "kv_cache_dtype": name, "baseline_us": base,
                         "working_tree_us": new, "time_ratio": new / base})  # fmt: skip
    report = {"command": " ".join(sys.argv), "cpu": cpu_name(), "threads": args.threads,
              "baseline": args.baseline, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['cpu']}, {args.threads} thread(s), one row, 4 x 64 heads, us a call (median "
          f"of {args.rounds} interleaved rounds); baseline {args.baseline}")  # fmt: skip
    print("| context | KV dtype | baseline | working tree | time ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['kv_cache_dtype']} | {r['baseline_us']:.1f} | "
              f"{r['working_tree_us']:.1f} | {r['time_ratio']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
