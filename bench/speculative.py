"""Self-speculative decoding on the built-in model: speed against plain decoding, same run.

    python bench/speculative.py [--rounds 3] [--tokens 96] [--drafts 1,2,3] [--ks 3,4,6]
                                [--out bench/out/speculative.json]

One compiled engine in this process (the server's: inductor decode and verify graphs, kernel
threads as the server picks them, per-loop KV policy so that greedy output must match exactly).
Streams are greedy continuations of held-out stdlib text (the model never saw it), at T = the
model's mean recurrence:

1. greedy agreement of every draft depth with depth T on held-out text (teacher-forced);
2. one stream: plain decoding and every (draft depth d, tokens k) of the sweep, interleaved
   (each round runs every configuration once per prompt, in a rotated order), tokens/s as the
   median over rounds, with the acceptance rate and whether the output equals plain decoding;
3. under the lossy `first:2` KV policy (the built-in's `--kv-policy auto`): how often greedy
   output with the best configuration equals plain decoding's (20 prompts);
4. 2, 4, 8 and 16 concurrent streams, speculation forced vs plain (where the under-load switch
   belongs); 32 streams: speculation requested by every request vs not at all, with the
   server's switch (`--speculative-max-batch`) and with it forced.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fast_engine import cpu_name  # noqa: E402
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint  # noqa: E402
from parcae_serve.model.tokenizer import Tokenizer  # noqa: E402
from parcae_serve.server.api.app import kernel_threads  # noqa: E402
from parcae_serve.server.calibration.calibrate import heldout_sequences  # noqa: E402
from parcae_serve.server.engine.engine import Engine, EngineConfig  # noqa: E402
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy  # noqa: E402
from parcae_serve.server.engine.sampling import SamplingParams  # noqa: E402
from parcae_serve.server.engine.scheduler import SchedulerConfig  # noqa: E402
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, Speculation  # noqa: E402
from tests.helpers import outputs_together  # noqa: E402


def agreement_by_depth(model, tokenizer, depth: int) -> dict[int, float]:
    """Teacher-forced on held-out text (24 windows of 256 tokens): how often depth d's argmax
    is depth T's, for every d < T (the acceptance a greedy draft at depth d can expect)."""
    data = torch.tensor(heldout_sequences(tokenizer, 40, 257)[16:])[:, :-1]
    with torch.inference_mode():
        argmax = {
            d: model(data, d, torch.Generator().manual_seed(0)).argmax(-1)
            for d in range(1, depth + 1)
        }
    return {d: (argmax[d] == argmax[depth]).float().mean().item() for d in range(1, depth)}


def make_engine(model, depth: int, specs: list[Speculation], spec_max_batch: int) -> Engine:
    scheduler = SchedulerConfig(64, 64, 512, 2048, spec_max_batch)
    threads = torch.get_num_threads()  # main() set the server default; the engine thread needs it
    config = EngineConfig(
        scheduler, kv_cache_bytes=512 * 2**20, compile="inductor", threads=threads
    )
    engine = Engine(model, config)
    engine.compile_decode([depth])
    for spec in specs:
        engine.compile_decode([depth], spec)
    engine.start()
    return engine


def request(
    prompt: list[int], depth: int, tokens: int, spec: Speculation | None, policy=None, **sampled
):
    sampled = {"temperature": 0.0, **sampled}
    sampling = SamplingParams(max_tokens=tokens, ignore_eos=True, **sampled)
    loops = LoopParams(depth, kv_policy=policy, speculative=spec)
    return EngineRequest(list(prompt), sampling, loops)


def sampling_speed(engine, prompts, depth, tokens, spec, rounds) -> dict:
    """One stream sampling at temperature 0.8 (seeded), plain vs `spec`: drafts one decode
    call per token (the fused draft graph is greedy only), rejection sampling per token."""
    rates: dict[str, list[float]] = {"plain": [], "speculative": []}
    drafted = accepted = 0
    for r in range(rounds):
        for i, prompt in enumerate(prompts):
            for name, s in (("plain", None), ("speculative", spec))[:: 1 if r % 2 else -1]:
                run = one_stream(engine, prompt, depth, tokens, s, temperature=0.8, seed=r * 97 + i)
                rates[name].append(run["tps"])
                drafted, accepted = drafted + run["drafted"], accepted + run["accepted"]
    plain, fast = (statistics.median(rates[n]) for n in ("plain", "speculative"))
    return {"plain": plain, "speculative": fast, "ratio": fast / plain,
            "acceptance": accepted / max(1, drafted)}  # fmt: skip


def lossy_agreement(engine, prompts, depth, tokens, spec, policy: LoopSlotPolicy) -> dict:
    """Under a lossy KV policy the verify chunk reads its own tokens' loop-t K/V where plain
    decoding reads the slot's last loop: how far greedy outputs agree."""
    same, prefix = 0, []
    for prompt in prompts:
        outs = [
            engine.generate_sync(request(prompt, depth, tokens, s, policy)) for s in (None, spec)
        ]
        a, b = ([o.token for o in out if o.token is not None] for out in outs)
        same += a == b
        prefix.append(
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        )
    return {"policy": str(policy), "identical": same / len(prompts),
            "mean_common_prefix": statistics.mean(prefix), "tokens": tokens}  # fmt: skip


def one_stream(engine: Engine, prompt, depth, tokens, spec, **sampled) -> dict:
    start = time.perf_counter()
    outs = engine.generate_sync(request(prompt, depth, tokens, spec, **sampled))
    elapsed = time.perf_counter() - start
    last = outs[-1]
    return {
        "tps": tokens / elapsed,
        "tokens": [o.token for o in outs if o.token is not None],
        "drafted": last.draft_tokens,
        "accepted": last.accepted_tokens,
    }


def single_stream_sweep(engine, prompts, depth, tokens, configs, rounds) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
    for r in range(rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for prompt in prompts:
            for name, spec in order:
                runs[name].append(one_stream(engine, prompt, depth, tokens, spec))
    plain = {i: run["tokens"] for i, run in enumerate(runs["plain"][: len(prompts)])}
    out = {}
    for name, spec in configs:
        rs = runs[name]
        # per round: the total tokens over every prompt / the total time
        per_round = [
            len(prompts) * tokens / sum(tokens / x["tps"] for x in rs[i : i + len(prompts)])
            for i in range(0, len(rs), len(prompts))
        ]
        drafted = sum(x["drafted"] for x in rs)
        out[name] = {
            "draft_depth": spec.draft_depth if spec else None,
            "k": spec.tokens if spec else None,
            "tps": statistics.median(per_round),
            "acceptance": sum(x["accepted"] for x in rs) / drafted if drafted else None,
            "same_as_plain": all(x["tokens"] == plain[i % len(prompts)] for i, x in enumerate(rs)),
        }
    base = out["plain"]["tps"]
    for row in out.values():
        row["speedup"] = row["tps"] / base
    return out


def many_streams(engine, prompts, depth, tokens, spec, rounds: int, streams: int = 32) -> float:
    rates = []
    for _ in range(rounds):
        reqs = [request(prompts[i % len(prompts)], depth, tokens, spec) for i in range(streams)]
        start = time.perf_counter()
        outs = outputs_together(engine, reqs, timeout=600)
        elapsed = time.perf_counter() - start
        rates.append(sum(len([o for o in out if o.token is not None]) for out in outs) / elapsed)
    return statistics.median(rates)


def render(r: dict) -> str:
    lines = [
        f"CPU: {r['cpu']}; built-in model, T = {r['depth']}, greedy, {r['tokens']} new tokens "
        f"after {r['prompt_tokens']}-token held-out prompts x {r['prompts']}, {r['rounds']} rounds.",
        "",
        "| configuration | tokens/s | vs plain | acceptance | same output |",
        "|---|---|---|---|---|",
    ]
    for name, row in r["one_stream"].items():
        acc = "" if row["acceptance"] is None else f"{row['acceptance']:.1%}"
        lines.append(
            f"| {name} | {row['tps']:.0f} | {row['speedup']:.2f}x | {acc} | "
            f"{'yes' if row['same_as_plain'] else 'NO'} |"
        )
    lines += ["", "| concurrent streams | plain tok/s | speculative (forced) tok/s | ratio |",
              "|---|---|---|---|"]  # fmt: skip
    for n, row in r["few"].items():
        lines.append(
            f"| {n} | {row['plain']:.0f} | {row['speculative']:.0f} | {row['ratio']:.2f}x |"
        )
    smp = r["sampled"]
    lines += [
        "",
        f"Sampling (temperature 0.8, seeded), one stream, best configuration: "
        f"{smp['speculative']:.0f} vs {smp['plain']:.0f} tok/s plain ({smp['ratio']:.2f}x), "
        f"acceptance {smp['acceptance']:.1%}.",
    ]
    agree = r["agreement_by_depth"]
    lines += [
        "",
        "| draft depth d | " + " | ".join(str(d) for d in agree) + " |",
        "|---|" + "---|" * len(agree),
        "| depth-d argmax = depth-T argmax (teacher-forced) | "
        + " | ".join(f"{a:.1%}" for a in agree.values())
        + " |",
    ]
    lossy = r["lossy"]
    lines += [
        "",
        f"Greedy agreement under `{lossy['policy']}` (lossy; the built-in's `--kv-policy auto`),"
        f" best configuration: {lossy['identical']:.0%} of outputs identical, mean common "
        f"prefix {lossy['mean_common_prefix']:.1f} of {lossy['tokens']} tokens.",
    ]
    m = r["many"]
    lines += [
        "",
        "| 32 concurrent streams | tokens/s | vs plain |",
        "|---|---|---|",
        f"| plain | {m['plain']:.0f} | 1.00x |",
        f"| speculation requested, server switch (<= {r['switch']} running) | {m['switch']:.0f} | "
        f"{m['switch'] / m['plain']:.2f}x |",
        f"| speculation forced at every batch size | {m['forced']:.0f} | "
        f"{m['forced'] / m['plain']:.2f}x |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--drafts", default="1,2,3")
    parser.add_argument("--ks", default="3,4,6")
    parser.add_argument("--many-rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/speculative.json")
    args = parser.parse_args()

    model_dir = builtin_checkpoint()
    model = load_checkpoint(model_dir)
    torch.set_num_threads(kernel_threads(model, torch.get_num_threads()))
    depth = model.cfg.mean_recurrence
    prompts = heldout_sequences(Tokenizer.from_dir(model_dir), 8 + args.prompts, 48)[8:]
    specs = [
        Speculation(int(d), int(k)) for d in args.drafts.split(",") for k in args.ks.split(",")
    ]
    configs = [("plain", None)] + [(f"d={s.draft_depth} k={s.tokens}", s) for s in specs]
    agreement = agreement_by_depth(model, Tokenizer.from_dir(model_dir), depth)
    started = time.monotonic()
    switch = SchedulerConfig().speculative_max_batch  # the server's default
    engine = make_engine(model, depth, specs, spec_max_batch=switch)
    print(f"compiled in {time.monotonic() - started:.0f} s", flush=True)
    one = single_stream_sweep(engine, prompts, depth, args.tokens, configs, args.rounds)
    best = max((row for row in one.values() if row["k"]), key=lambda row: row["tps"])
    best_spec = Speculation(best["draft_depth"], best["k"])
    sampled = sampling_speed(engine, prompts, depth, args.tokens, best_spec, args.rounds)
    lossy = lossy_agreement(
        engine, heldout_sequences(Tokenizer.from_dir(model_dir), 28, 48)[8:], depth,
        args.tokens, best_spec, LoopSlotPolicy.parse("first:2"),
    )  # fmt: skip
    many = {
        "plain": many_streams(engine, prompts, depth, 48, None, args.many_rounds),
        "switch": many_streams(engine, prompts, depth, 48, best_spec, args.many_rounds),
    }
    engine.scheduler.config.speculative_max_batch = 64
    many["forced"] = many_streams(engine, prompts, depth, 48, best_spec, args.many_rounds)
    few = {}  # where the switch belongs: speculation forced vs plain at a few streams
    for n in (2, 4, 8, 16):
        plain = many_streams(engine, prompts, depth, 48, None, args.many_rounds, n)
        fast = many_streams(engine, prompts, depth, 48, best_spec, args.many_rounds, n)
        few[n] = {"plain": plain, "speculative": fast, "ratio": fast / plain}
    engine.stop()
    result = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "depth": depth,
        "tokens": args.tokens,
        "prompt_tokens": 48,
        "prompts": args.prompts,
        "rounds": args.rounds,
        "one_stream": one,
        "best": best,
        "many": many,
        "few": few,
        "agreement_by_depth": agreement,
        "lossy": lossy,
        "switch": switch,
        "sampled": sampled,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
