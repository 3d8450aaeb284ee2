"""32 streams of mixed depths in one engine: rows of several depths in one decode graph call
(`merge_keys`, the engine's default) against one call per depth, in-process (no HTTP).

    python bench/mixed_depths.py [--rounds 5] [--threads 1] [--depths 4,6,8] [--streams 32]
                                 [--out bench/out/mixed_depths.json]

The built-in model, its default KV policy (shared:1, what `--kv-policy auto` picks for it),
decode graphs compiled for each depth. Each round submits `--streams` greedy requests of 48 new
tokens at once, the depths in turn, once with merged calls and once with a call per depth (A and
B interleaved; the same engine, its runner's merge slack set to 1: only equal keys share a call).
Prints aggregate decode tokens/s and, at each stream's measured tokens/s, the model's FLOP rate
against this machine's matmul rate (bench/fast_engine.py's cost model and measurement). Also
what bounds it: the model's matrix products alone, for one decode step of `--streams` rows at
the mean depth (each layer's weights in the order a token reads them, `mm` as the graphs call
it), timed at the same thread count; and how many streams got the same greedy tokens from
both ways (row counts change the matmuls' summation order, so a near tie may flip).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from parcae_serve.server.api.openmp import spin_briefly_when_idle

spin_briefly_when_idle()  # as the server does, before torch loads OpenMP

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.fast_engine import cpu_name, matmul_gflops, token_flops  # noqa: E402
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint  # noqa: E402
from parcae_serve.server.engine.decode_graph import MERGE_SLACK  # noqa: E402
from parcae_serve.server.engine.engine import Engine, EngineConfig  # noqa: E402
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy  # noqa: E402
from parcae_serve.server.engine.sampling import SamplingParams  # noqa: E402
from parcae_serve.server.engine.scheduler import SchedulerConfig  # noqa: E402
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams  # noqa: E402
from tests.helpers import outputs_together  # noqa: E402

NEW_TOKENS = 48
CONTEXT = 100  # positions the cost model charges attention for (prompts 16, + up to 48)
VARIANTS = {"merged": MERGE_SLACK, "per depth": 1.0}  # the runner's merge slack


def requests(depths: list[int], streams: int) -> list[EngineRequest]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    prompt = [(i * 37) % 4000 + 10 for i in range(16)]
    return [
        EngineRequest([i + 1, *prompt], params, LoopParams(depths[i % len(depths)]))
        for i in range(streams)
    ]


def run(engine: Engine, reqs: list[EngineRequest]) -> tuple[float, list[list[int]]]:
    """Aggregate tokens/s of `reqs` submitted at once, and each one's tokens."""
    start = time.perf_counter()
    outs = outputs_together(engine, reqs, timeout=600)
    seconds = time.perf_counter() - start
    return sum(len(o) for o in outs) / seconds, [[s.token for s in o] for o in outs]


def step_weights(model, depth: int) -> list[torch.Tensor]:
    """The (out, in) weights one decode token multiplies, in order: per layer the fused QKV
    (as the graphs fuse it), attention output and both MLP matrices; the adapter, C and the
    LM head once."""
    t = model.transformer

    def layer(block) -> list[torch.Tensor]:
        a, m = block.attn, block.mlp
        qkv = torch.cat([a.c_q.weight, a.c_k.weight, a.c_v.weight])
        return [qkv, a.c_proj.weight, m.fc.weight, m.proj.weight]

    core = [w for block in t["core_block"] for w in layer(block)]
    return [*layer(t["prelude"][0]), t["adapter"].B, *core * depth, t["C"].weight,
            *layer(t["coda"][0]), model.lm_head.weight]  # fmt: skip


def matmuls_alone_gflops(model, rows: int, depth: int, reps: int = 20) -> float:
    """GFLOP/s of `step_weights` multiplied by `rows` rows each, one after another."""
    weights = [w.detach().contiguous() for w in step_weights(model, depth)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}

    def step() -> None:
        for w in weights:
            torch.mm(inputs[w.shape[1]], w.t())

    step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    seconds = (time.perf_counter() - start) / reps
    return sum(2 * rows * w.numel() for w in weights) / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--depths", default="4,6,8")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/mixed_depths.json")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    rate = matmul_gflops(2)
    model = load_checkpoint(builtin_checkpoint())
    sched = SchedulerConfig(max_batch=64, max_queue=64, prefill_chunk=512, max_context=2048)
    config = EngineConfig(sched, kv_policy=LoopSlotPolicy.parse("shared:1"),
                          kv_cache_bytes=512 * 2**20, compile="inductor", threads=args.threads)  # fmt: skip
    torch.set_num_threads(args.threads)
    alone = statistics.median(
        matmuls_alone_gflops(model, args.streams, round(statistics.mean(depths))) for _ in range(5)
    )
    engine = Engine(model, config)
    engine.compile_decode(sorted(set(depths)))
    engine.start()
    reqs = requests(depths, args.streams)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    tokens: dict[str, list[list[int]]] = {}
    try:
        run(engine, reqs)  # warm-up
        for _ in range(args.rounds):
            for name, slack in VARIANTS.items():
                engine.runner.merge_slack = slack
                tps, tokens[name] = run(engine, reqs)
                times[name].append(tps)
    finally:
        engine.stop()
    flops = statistics.mean(token_flops(model, d, CONTEXT) for d in depths)
    rows = {name: {"tokens_per_s": statistics.median(t),
                   "of_matmul_rate": statistics.median(t) * flops / 1e9 / rate}
            for name, t in times.items()}  # fmt: skip
    report = {"command": " ".join(sys.argv), "cpu": cpu_name(), "threads": args.threads,
              "depths": depths, "streams": args.streams, "matmul_gflops_all": rate,
              "merged_vs_per_depth": rows["merged"]["tokens_per_s"]
              / rows["per depth"]["tokens_per_s"], "rows": rows,
              "same_tokens": sum(a == b for a, b in zip(*tokens.values(), strict=True)),
              "matmuls_alone_gflops": alone, "matmuls_alone_of_matmul_rate": alone / rate}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['cpu']}, {args.threads} kernel threads, {args.streams} streams of depths "
          f"{args.depths}, matmul rate {rate:.0f} GFLOP/s")  # fmt: skip
    print("| calls | tokens/s | of the matmul rate |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['of_matmul_rate']:.1%} |")
    print(f"streams with the same greedy tokens either way: {report['same_tokens']} of "
          f"{args.streams}")  # fmt: skip
    print(f"merged / per depth: {report['merged_vs_per_depth']:.2f}x; the step's matmuls alone "
          f"at {args.streams} rows: {alone:.0f} GFLOP/s = {alone / rate:.0%} of the matmul rate")  # fmt: skip


if __name__ == "__main__":
    main()
