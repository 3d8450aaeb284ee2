"""Fast-engine benchmark: decode against the machine's limits, compiled path vs eager.

    python bench/fast_engine.py [--rounds 3] [--sections reference,builtin,context,big]
                                [--out bench/out/fast_engine.json]

Measures, in one run on this machine:
1. the machine: fp32 matmul GFLOP/s and DRAM read GB/s, at one thread and at all cores;
2. the reference shape (random weights, d=128, P/R/C 2/2/2, vocab 512, T=8, 16-token prompt,
   64 new tokens, greedy): one stream over HTTP with the compiled decode path and with
   `--compile off`, and the same compiled engine in-process (what HTTP costs), against a
   research-style `generate()` in-process (eager modules, one
   contiguous K/V tensor per (layer, loop), what a paper's reference loop does); A and B
   interleaved, `--rounds` times, medians reported;
3. the built-in model: one stream at its mean depth against its ceiling (the larger of its
   compute time at the measured matmul rate and its weight-read time at the measured
   bandwidth), 32 concurrent streams of mixed depths against the matmul rate;
   (section `context`) its decode speed at 900 tokens of context against 64, one server per
   KV-cache dtype (the default fp32, `--kv-cache-dtype float16` and `fp8`), interleaved; and
   what the memory system allows: a token's reads replayed without its arithmetic (weights
   and pools, in the order a token reads them) at 64 and 900 positions;
4. a Parcae-140m-shaped model (d=768, 2/2/2, vocab 32768, fp32, random): one stream at T=8
   against the DRAM bandwidth (bytes it must read per token / measured GB/s), over HTTP with
   the prefill included, and decode only (the server's time-per-output-token histogram).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from parcae_serve.server.api.openmp import spin_briefly_when_idle

spin_briefly_when_idle()  # as the server does, before torch loads OpenMP

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import PROMPT, reference_checkpoint, run_streams  # noqa: E402
from parcae_serve.model.config import ParcaeConfig  # noqa: E402
from parcae_serve.model.loading import (  # noqa: E402
    builtin_checkpoint,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from parcae_serve.model.parcae import Parcae, sdpa  # noqa: E402
from parcae_serve.server.api.app import kernel_threads  # noqa: E402
from parcae_serve.server.engine.engine import Engine, EngineConfig  # noqa: E402
from parcae_serve.server.engine.sampling import SamplingParams  # noqa: E402
from parcae_serve.server.engine.scheduler import SchedulerConfig  # noqa: E402
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams  # noqa: E402
from tests.conftest import running_server  # noqa: E402
from tests.helpers import metric, random_model  # noqa: E402

SERVER_FLAGS = ("--kv-cache-bytes", str(512 * 2**20), "--max-batch", "64")
COMPILED = (*SERVER_FLAGS, "--compile", "auto")  # the test helper defaults to --compile off
TPOT = "parcae_time_per_output_token_seconds"  # the server's histogram (sum, count)


# The machine ---------------------------------------------------------------------------------
def matmul_gflops(threads: int, n: int = 1536, reps: int = 6) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def read_gbps(threads: int, mib: int = 1024, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2**18)  # fp32
    x.sum()
    start = time.perf_counter()
    for _ in range(reps):
        x.sum()
    return x.numel() * 4 * reps / (time.perf_counter() - start) / 1e9


# Cost model of one decode token --------------------------------------------------------------
def weight_params(model: Parcae) -> dict[str, int]:
    """Parameters each part multiplies per token (embeddings are looked up, not multiplied)."""
    t = model.transformer
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {  # the adapter's B e is loop-invariant: computed once per token, with the prelude
        "prelude": count(t["prelude"]) + count(t["adapter"]),
        "core": count(t["core_block"]),
        "coda": count(t["coda"]) + count(t["C"]) + model.lm_head.weight.numel(),
    }


def token_flops(model: Parcae, depth: int, context: int) -> float:
    """Multiply-adds x 2 of one decode token: weights, plus attention over the context."""
    w, cfg = weight_params(model), model.cfg
    outer_layers = cfg.n_layers_in_prelude + cfg.n_layers_in_coda
    attention = (
        2
        * context
        * (outer_layers * cfg.n_embd + depth * cfg.n_layers_in_recurrent_block * cfg.d_rec)
    )
    return 2 * (w["prelude"] + depth * w["core"] + w["coda"] + attention)


def token_bytes(model: Parcae, depth: int) -> float:
    """Weight bytes one stream must read per token when the weights do not stay in cache: the
    core block is read again on every loop."""
    w = weight_params(model)
    size = next(model.parameters()).element_size()
    return size * (w["prelude"] + depth * w["core"] + w["coda"])


# The research-style baseline -----------------------------------------------------------------
class ContiguousCache:
    """A paper's reference decode: one growing K/V tensor per (layer, loop) key, SDPA on it."""

    def __init__(self) -> None:
        self.kv: dict[tuple, tuple[Tensor, Tensor]] = {}

    def attend(self, key: tuple, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if key in self.kv:
            pk, pv = self.kv[key]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        self.kv[key] = (k, v)
        return sdpa(q, k, v, causal=q.shape[2] > 1)


@torch.inference_mode()
def research_generate(model: Parcae, prompt: list[int], depth: int, new_tokens: int) -> float:
    """Greedy decode with a per-(layer, loop) cache, eager; returns tokens/s (prefill included,
    as a stream's tokens/s is)."""
    cache, ids, start = ContiguousCache(), torch.tensor([prompt]), time.perf_counter()
    pos = torch.arange(len(prompt))[None]
    for _ in range(new_tokens):
        rots = model.rotations(pos)
        e = model.prelude(ids, rots, cache)
        prepared = model.transformer["adapter"].prepare(e)
        h = torch.zeros(*ids.shape, model.cfg.d_rec)
        for t in range(depth):
            h = model.core(h, prepared, ids, rots, cache, t)
        nxt = model.coda(h, ids, rots, cache)[0, -1].argmax()
        ids, pos = nxt.view(1, 1), pos[:, -1:] + 1
    return new_tokens / (time.perf_counter() - start)


# HTTP measurements ---------------------------------------------------------------------------
def stream_tps(url: str, depths: list[int], new_tokens: int, prompt: list[int] = PROMPT) -> dict:
    results, wall = asyncio.run(run_streams(url, depths, new_tokens, prompt))
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens_per_s": tokens / wall,
        "tpot_ms": statistics.median(r["tpot"] for r in results) * 1e3,
    }


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def engine_tps(engine: Engine, depth: int, new_tokens: int) -> float:
    """One greedy stream through the engine in-process (no HTTP), prefill included."""
    sampling = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.generate_sync(EngineRequest(list(PROMPT), sampling, LoopParams(depth)))
    return new_tokens / (time.perf_counter() - start)


def compiled_engine(model: Parcae, depth: int) -> Engine:
    """The server's engine with the compiled decode path, in this process (kernel threads: 1,
    as the server's default for a model this small)."""
    scheduler = SchedulerConfig(max_batch=64, max_queue=64, prefill_chunk=512, max_context=2048)
    config = EngineConfig(scheduler, kv_cache_bytes=512 * 2**20, compile="inductor", threads=1)
    engine = Engine(model, config)
    engine.compile_decode([depth])
    engine.start()
    return engine


def reference_section(model_dir: Path, rounds: int) -> dict:
    model = load_checkpoint(model_dir)  # the eager baseline's; the engine gets its own copy
    torch.set_num_threads(1)
    engine = compiled_engine(load_checkpoint(model_dir), 8)
    try:
        return reference_runs(model, model_dir, engine, rounds)
    finally:
        engine.stop()


def reference_runs(model: Parcae, model_dir: Path, engine: Engine, rounds: int) -> dict:
    research, in_process = [], []
    with (
        running_server(model_dir, *COMPILED, timeout=900, threads=None) as fast,
        running_server(model_dir, *SERVER_FLAGS, "--compile", "off", threads=None) as eager,
    ):
        for url in (fast.url, eager.url):
            stream_tps(url, [8], 8)  # warm-up
        fast_runs, eager_runs = [], []
        for _ in range(rounds):  # A and B interleaved
            torch.set_num_threads(1)
            research.append(research_generate(model, PROMPT, 8, 64))
            in_process.append(engine_tps(engine, 8, 64))
            fast_runs.append(stream_tps(fast.url, [8], 64))
            eager_runs.append(stream_tps(eager.url, [8], 64))
    base = statistics.median(research)
    return {
        "research_generate_tps": base,
        "engine_compiled_tps": statistics.median(in_process),
        "engine_vs_research": statistics.median(in_process) / base,
        "http_compiled_tps": median_of(fast_runs, "tokens_per_s"),
        "http_eager_tps": median_of(eager_runs, "tokens_per_s"),
        "compiled_vs_research": median_of(fast_runs, "tokens_per_s") / base,
        "eager_vs_research": median_of(eager_runs, "tokens_per_s") / base,
    }


def builtin_section(machine: dict, rounds: int) -> dict:
    model_dir = builtin_checkpoint()
    model = load_checkpoint(model_dir)
    T = model.cfg.mean_recurrence
    mixed = [T - 2, T, T + 2]
    flags = (*COMPILED, "--compile-depths", ",".join(map(str, mixed)))
    logs = ROOT / "bench/out"
    logs.mkdir(parents=True, exist_ok=True)
    with running_server(
        model_dir, *flags, timeout=1800, log=logs / "builtin_fp32.log", threads=None
    ) as server:
        stream_tps(server.url, [T], 8)
        one = [stream_tps(server.url, [T], 64) for _ in range(rounds)]
        depths = [mixed[i % 3] for i in range(32)]
        many = [stream_tps(server.url, depths, 48) for _ in range(rounds)]
    one_tps = median_of(one, "tokens_per_s")
    flops, wbytes = token_flops(model, T, 100), token_bytes(model, T)
    ceiling_s = max(
        flops / (machine["matmul_gflops_all"] * 1e9), wbytes / (machine["read_gbps_all"] * 1e9)
    )
    many_tps = median_of(many, "tokens_per_s")
    mean_flops = statistics.mean(token_flops(model, d, 100) for d in depths)
    return {
        "depth": T,
        "one_stream_tps": one_tps,
        "one_stream_ceiling_tps": 1 / ceiling_s,
        "one_stream_of_ceiling": one_tps / (1 / ceiling_s),
        "streams32_tps": many_tps,
        "streams32_gflops": many_tps * mean_flops / 1e9,
        "streams32_of_matmul_rate": many_tps * mean_flops / 1e9 / machine["matmul_gflops_all"],
    }


KV_DTYPES = {"fp32": "float32", "fp16": "float16", "fp8": "fp8"}  # --kv-cache-dtype per name
KV_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "fp8": 1}
CONTEXTS = (64, 900)


def replay_token_ms(model: Parcae, kv_bytes: int, n: int, threads: int, tokens: int = 30) -> float:
    """One decode token's reads replayed without its arithmetic, ms: the weights and K/V pools
    at `n` positions, each a buffer summed in the order a token reads them under `shared:1`
    (the built-in's policy: one slot for every loop): the prelude layers' weights and pools,
    the core block's layers and pools on each of T loops, then the coda's and the head. What
    the caches keep between reads is what they keep for the real token, minus its
    activations."""
    torch.set_num_threads(threads)
    cfg, T = model.cfg, model.cfg.mean_recurrence

    def buffer(nbytes: int) -> Tensor:
        return torch.ones(max(1, nbytes // 4))

    def layer(block: str) -> list[Tensor]:  # a layer's weights, then its K and V pool rows
        layers = model.transformer[block]
        weights = sum(p.numel() for p in layers.parameters()) // len(layers)
        if block == "core_block":
            heads, hd = cfg.recurrent_kv_heads, cfg.d_rec // cfg.recurrent_num_attention_heads
        else:
            heads, hd = cfg.num_key_value_heads, cfg.n_embd // cfg.num_attention_heads
        pool = n * heads * hd * kv_bytes
        return [buffer(4 * weights), buffer(pool), buffer(pool)]

    prelude = [x for _ in range(cfg.n_layers_in_prelude) for x in layer("prelude")]
    core = [[*layer("core_block")] for _ in range(cfg.n_layers_in_recurrent_block)]
    coda = [x for _ in range(cfg.n_layers_in_coda) for x in layer("coda")]
    head = buffer(4 * model.lm_head.weight.numel())
    order = [*prelude, *[x for _ in range(T) for lay in core for x in lay], *coda, head]
    for x in order * 3:
        x.sum()
    start = time.perf_counter()
    for _ in range(tokens):
        for x in order:
            x.sum()
    return (time.perf_counter() - start) / tokens * 1e3


def context_bound(model: Parcae, threads: int, rounds: int = 5) -> dict:
    """How much more a token's reads cost at 900 positions than at 64, per KV-cache dtype,
    replayed (`replay_token_ms`, the lengths interleaved, medians): added to a measured TPOT
    at 64 it bounds the speed ratio 900 vs 64 that the memory system leaves."""
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, kv_bytes in KV_ELEMENT_BYTES.items():
            for n in CONTEXTS:
                times.setdefault((name, n), []).append(replay_token_ms(model, kv_bytes, n, threads))
    out = {f"replay_ms_{name}_{n}": statistics.median(t) for (name, n), t in times.items()}
    for name in KV_ELEMENT_BYTES:
        out[f"extra_ms_{name}"] = out[f"replay_ms_{name}_900"] - out[f"replay_ms_{name}_64"]
    return out


def context_section(rounds: int) -> dict:
    """The built-in model, one stream at its mean depth: TPOT at 64 and at 900 tokens of
    context, one server per KV-cache dtype (each compiled for that depth only), the servers
    and lengths interleaved `rounds` times."""
    model_dir = builtin_checkpoint()
    T = ParcaeConfig.from_dict(read_config(model_dir)).mean_recurrence  # no weights needed
    long_prompt = [(i * 7919) % 4000 + 10 for i in range(900)]
    logs = ROOT / "bench/out"
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(running_server(
                model_dir, *COMPILED, "--compile-depths", str(T), "--kv-cache-dtype", dtype,
                timeout=1800, log=logs / f"context_{name}.log", threads=None,
            ))
            for name, dtype in KV_DTYPES.items()
        }  # fmt: skip
        for server in servers.values():
            stream_tps(server.url, [T], 8)
        context: dict[str, list[dict]] = {}
        for _ in range(rounds):
            for name, server in servers.items():
                for n in (64, 900):
                    got = stream_tps(server.url, [T], 64, long_prompt[:n])
                    context.setdefault(f"{name}_{n}", []).append(got)
    figures = context_figures(context)
    model = load_checkpoint(model_dir)
    bound = context_bound(model, threads=kernel_threads(model, os.cpu_count() or 1))  # as served
    for name in KV_DTYPES:  # the measured TPOT at 64 plus the least that 900 costs more
        t64 = figures[f"tpot_ms_{name}_64"]
        bound[f"ratio_bound_{name}"] = t64 / (t64 + bound[f"extra_ms_{name}"])
    return {"depth": T, **figures, "bound": bound}


def context_figures(context: dict[str, list[dict]]) -> dict:
    """TPOT at 64 and 900 positions, per KV-cache dtype, and the speed ratios: each dtype's
    900 against its own 64, and against fp32's 64 (the default's short-context speed, what a
    user switching the flag on compares with)."""
    tpot = {key: median_of(runs, "tpot_ms") for key, runs in context.items()}
    out = {f"tpot_ms_{key}": value for key, value in tpot.items()}
    for name in KV_DTYPES:
        out[f"speed_900_vs_64_{name}"] = tpot[f"{name}_64"] / tpot[f"{name}_900"]
        out[f"speed_900_{name}_vs_64_fp32"] = tpot["fp32_64"] / tpot[f"{name}_900"]
    return out


def big_section(machine: dict, rounds: int, tmp: Path) -> dict:
    cfg = ParcaeConfig(n_embd=768, num_attention_heads=12, vocab_size=32768, n_layers_in_prelude=2,
                       n_layers_in_recurrent_block=2, n_layers_in_coda=2, mean_recurrence=8,
                       block_size=1024)  # fmt: skip
    model = random_model(cfg)
    model_dir = tmp / "parcae-140m-shape"
    save_checkpoint(model, model_dir)
    (model_dir / "tokenizer.json").write_bytes(
        (builtin_checkpoint() / "tokenizer.json").read_bytes()
    )
    with running_server(model_dir, *COMPILED, timeout=1800, threads=None) as server:
        stream_tps(server.url, [8], 4)
        before = [metric(server.url, f"{TPOT}_{part}") for part in ("sum", "count")]
        runs = [stream_tps(server.url, [8], 32) for _ in range(rounds)]
        after = [metric(server.url, f"{TPOT}_{part}") for part in ("sum", "count")]
    tps = median_of(runs, "tokens_per_s")
    tpot = (after[0] - before[0]) / (after[1] - before[1])  # mean over the runs' requests
    wbytes = token_bytes(model, 8)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "one_stream_tps": tps,
            "bytes_per_token_mb": wbytes / 1e6, "achieved_gbps": tps * wbytes / 1e9,
            "of_bandwidth": tps * wbytes / 1e9 / machine["read_gbps_all"],
            "server_tpot_ms": tpot * 1e3, "decode_gbps": wbytes / tpot / 1e9,
            "decode_of_bandwidth": wbytes / tpot / 1e9 / machine["read_gbps_all"]}  # fmt: skip


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line), ""
    )
    return f"{name or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__}"


def render(r: dict) -> str:
    m = r["machine"]
    rows = [
        ("matmul fp32, 1 thread / all cores", f"{m['matmul_gflops_1']:.0f} / {m['matmul_gflops_all']:.0f} GFLOP/s"),
        ("DRAM read, 1 thread / all cores", f"{m['read_gbps_1']:.1f} / {m['read_gbps_all']:.1f} GB/s"),
    ]  # fmt: skip
    if "reference" in r:
        rows += reference_rows(r["reference"])
    if "builtin" in r:
        rows += builtin_rows(r["builtin"])
    if "context" in r:
        rows += context_rows(r["context"])
    if "big" in r:
        rows += big_rows(r["big"])
    head = [
        f"command: `{r['command']}`",
        f"machine: {r['cpu']}",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    return "\n".join(head + [f"| {a} | {b} |" for a, b in rows])


def reference_rows(ref: dict) -> list[tuple[str, str]]:
    return [
        ("reference shape: research-style generate(), in-process", f"{ref['research_generate_tps']:.0f} tok/s"),
        ("reference shape: one stream over HTTP, eager (`--compile off`)", f"{ref['http_eager_tps']:.0f} tok/s ({ref['eager_vs_research']:.2f}x)"),
        ("reference shape: one stream in-process (engine, no HTTP), compiled", f"{ref['engine_compiled_tps']:.0f} tok/s ({ref['engine_vs_research']:.2f}x)"),
        ("reference shape: one stream over HTTP, compiled", f"**{ref['http_compiled_tps']:.0f} tok/s ({ref['compiled_vs_research']:.2f}x)**"),
    ]  # fmt: skip


def builtin_rows(b: dict) -> list[tuple[str, str]]:
    return [
        (f"built-in, one stream, T={b['depth']}", f"{b['one_stream_tps']:.0f} tok/s = {b['one_stream_of_ceiling']:.0%} of its ceiling ({b['one_stream_ceiling_tps']:.0f} tok/s)"),
        ("built-in, 32 streams, mixed depths", f"{b['streams32_tps']:.0f} tok/s = {b['streams32_gflops']:.1f} GFLOP/s = {b['streams32_of_matmul_rate']:.0%} of the matmul rate"),
    ]  # fmt: skip


def context_rows(c: dict) -> list[tuple[str, str]]:
    b = c["bound"]
    return [
        (f"built-in, T={c['depth']}, TPOT at 64 / 900 tokens of context, `--kv-cache-dtype {dtype}`",
         f"{c[f'tpot_ms_{name}_64']:.2f} / {c[f'tpot_ms_{name}_900']:.2f} ms (speed ratio **{c[f'speed_900_vs_64_{name}']:.2f}**; 900 here vs 64 on fp32: {c[f'speed_900_{name}_vs_64_fp32']:.2f})")
        for name, dtype in KV_DTYPES.items()
    ] + [
        (f"the same, its reads alone (replayed), `{dtype}`",
         f"{b[f'replay_ms_{name}_64']:.2f} / {b[f'replay_ms_{name}_900']:.2f} ms: 900 reads {b[f'extra_ms_{name}']:.2f} ms more, so the ratio can reach {b[f'ratio_bound_{name}']:.2f}")
        for name, dtype in KV_DTYPES.items()
    ]  # fmt: skip


def big_rows(big: dict) -> list[tuple[str, str]]:
    return [
        (f"140m-shaped ({big['params_m']:.0f}M params), one stream over HTTP, T=8 (prefill included)", f"{big['one_stream_tps']:.1f} tok/s x {big['bytes_per_token_mb']:.0f} MB = {big['achieved_gbps']:.1f} GB/s = {big['of_bandwidth']:.0%} of DRAM bandwidth"),
        ("140m-shaped, decode only (the server's mean TPOT)", f"{big['server_tpot_ms']:.1f} ms a token = {big['decode_gbps']:.1f} GB/s = {big['decode_of_bandwidth']:.0%} of DRAM bandwidth"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/fast_engine.json")
    parser.add_argument("--sections", default="reference,builtin,context,big",
                        help="which to run, comma-separated: reference, builtin, context, big")  # fmt: skip
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := set(sections) - {"reference", "builtin", "context", "big"}:
        parser.error(f"unknown sections {sorted(unknown)}: reference, builtin, context, big")
    cores = os.cpu_count() or 1
    machine = {"matmul_gflops_1": matmul_gflops(1), "matmul_gflops_all": matmul_gflops(cores),
               "read_gbps_1": read_gbps(1), "read_gbps_all": read_gbps(cores)}  # fmt: skip
    tmp = Path(tempfile.mkdtemp())
    report = {"command": " ".join(sys.argv), "cpu": cpu_name(), "machine": machine}
    if "reference" in sections:
        report["reference"] = reference_section(reference_checkpoint(tmp), args.rounds)
    if "builtin" in sections:
        report["builtin"] = builtin_section(machine, args.rounds)
    if "context" in sections:
        report["context"] = context_section(args.rounds)
    if "big" in sections:
        report["big"] = big_section(machine, args.rounds, tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
