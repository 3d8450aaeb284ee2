"""The adaptive-depth frontier: held-out NLL against decode throughput, N concurrent streams.

    python bench/frontier.py [--model DIR] [--streams 32] [--tokens 48] [--threads 1]
    python bench/frontier.py --confirm-only 8   # re-time the saved result's verdict

Every point decodes the same N held-out windows together, teacher-forced, through the engine's
own runner and paged cache (per-loop policy, eager), scheduled as the engine schedules decode:
a stream whose token exits starts its next token at the next loop (continuous depth batching,
`teacher_forced_nll`). Points: fixed depths T = 1 .. 2*mu, and each exit rule (kl, residual,
learned: the checkpoint's probe) over its thresholds with cap 2*mu. Each point: NLL, tokens/s,
mean loops. Plus the oracle exit (per token the smallest depth within eps of its loss at the
cap, from the fixed-depth runs' per-token losses: no rule can beat it, it sees the future), at
the throughput fixed depths reach at its mean loop count; the oracle that reaches the best fixed
depth's NLL in the fewest mean loops (per-token depths priced per loop, `oracle_at_nll`): how
much speed there is to win at equal quality; the label-blind (distribution) oracle; the exit
overhead per loop (a rule that never fires, against fixed T = cap); and the verdict's points
timed again, interleaved. Windows skip the first 64 held-out ones, which `parcae calibrate`
evaluates on and trains the probe on.

Writes bench/out/frontier.json and bench/frontier.png (needs matplotlib: the `bench` extra).
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

from parcae_serve.model.exit_probe import load_exit_probe  # noqa: E402
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint  # noqa: E402
from parcae_serve.model.tokenizer import Tokenizer  # noqa: E402
from parcae_serve.server.api.frontier import pareto  # noqa: E402
from parcae_serve.server.calibration.calibrate import THRESHOLDS, heldout_sequences  # noqa: E402
from parcae_serve.server.calibration.evaluation import teacher_forced_nll  # noqa: E402
from parcae_serve.server.calibration.learned_exit import (  # noqa: E402
    distribution_oracle,
    oracle,
    oracle_at_nll,
    trace_loops,
)
from parcae_serve.server.engine.sequence import RecurrenceExit  # noqa: E402

SKIP_WINDOWS = 64  # calibrate's evaluation windows (16) and the probe's training windows (48)
ORACLE_EPSILONS = (0.001, 0.01, 0.03)
KL_EPSILONS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6)  # distribution
# oracle: the smallest ones find where it matches the plateau's NLL
CONFIRM_ROUNDS = 5  # the verdict's points timed again, interleaved (one run each is noisy)
NEVER = {"residual": 0.0, "learned": 1 - 1e-9}  # thresholds at which a rule never exits (but
# still runs its test: the probe skips itself at exactly 1)


def interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through sorted xs (clamped at the ends)."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def measure(model, data, probe, mu: int, log) -> dict:
    cap = 2 * mu
    teacher_forced_nll(model, data, cap, exit=RecurrenceExit("residual", 0.1))  # warm-up
    fixed, per_token = [], []
    for depth in range(1, cap + 1):
        quality = teacher_forced_nll(model, data, depth, per_token=True)
        per_token.append(quality.token_nll)
        q = quality.summary()
        fixed.append({"kind": "fixed", "depth": depth, **q})
        log(f"fixed T={depth:2d}: nll {q['nll']:.4f} {q['tokens_per_s']:.0f} tok/s")
    best = min(fixed, key=lambda p: p["nll"])
    rules = run_rules(model, data, probe, cap, THRESHOLDS, log)
    if best["depth"] < cap:  # the same rules capped at the best depth: exits only save loops
        cheap = {k: v for k, v in THRESHOLDS.items() if k != "kl"}  # kl pays a coda a loop
        rules += run_rules(model, data, probe, best["depth"], cheap, log)
    by_loops = sorted(fixed, key=lambda p: p["mean_depth"])
    loops_axis = [p["mean_depth"] for p in by_loops]
    speed_axis = [p["tokens_per_s"] for p in by_loops]
    oracles = []
    for eps in ORACLE_EPSILONS:
        o = oracle(torch.tensor(per_token), eps)
        o["tokens_per_s"] = interpolate(o["mean_depth"], loops_axis, speed_axis)
        oracles.append(o)
        log(f"oracle eps {eps}: loops {o['mean_depth']:.2f} nll {o['nll']:.4f} "
            f"(at the cap {o['nll_at_cap']:.4f})")  # fmt: skip
    budgeted = oracle_at_nll(torch.tensor(per_token), best["nll"])
    if budgeted["mean_depth"] is not None:
        budgeted["tokens_per_s"] = interpolate(budgeted["mean_depth"], loops_axis, speed_axis)
        log(f"oracle at T={best['depth']}'s nll: loops {budgeted['mean_depth']:.2f} "
            f"≈ {budgeted['tokens_per_s']:.0f} tok/s")  # fmt: skip
    trace = trace_loops(model, data, best["depth"])
    blind = []
    for eps in KL_EPSILONS:
        o = distribution_oracle(trace, eps)
        o["tokens_per_s"] = interpolate(o["mean_depth"], loops_axis, speed_axis)
        blind.append(o)
        log(f"distribution oracle (cap {best['depth']}) eps {eps}: loops {o['mean_depth']:.2f} "
            f"nll {o['nll']:.4f}")  # fmt: skip
    return {"fixed": fixed, "rules": rules, "oracle": oracles, "oracle_at_best_fixed": budgeted,
            "distribution_oracle": blind,
            "overhead": exit_overhead(model, data, probe, cap, fixed[-1], log)}  # fmt: skip


def run_rules(model, data, probe, cap: int, thresholds: dict, log) -> list[dict]:
    """Every rule and threshold of `thresholds` at cap `cap` (the learned rule only with a
    probe)."""
    rows = []
    for criterion, values in thresholds.items():
        if criterion == "learned" and probe is None:
            continue
        for threshold in values:
            rule = RecurrenceExit(criterion, threshold)
            q = teacher_forced_nll(model, data, cap, exit=rule, exit_probe=probe).summary()
            rows.append({"kind": criterion, "threshold": threshold, "depth": cap, **q})
            log(f"{criterion} {threshold:g} cap {cap}: nll {q['nll']:.4f} "
                f"loops {q['mean_depth']:.2f} {q['tokens_per_s']:.0f} tok/s")  # fmt: skip
    return rows


def exit_overhead(model, data, probe, cap: int, fixed_cap: dict, log, repeats: int = 3) -> dict:
    """Per-loop cost of testing an exit rule: a rule that never fires at depth `cap`, against
    fixed T = cap (same loops), best of `repeats`, interleaved."""
    out = {}
    for criterion, never in NEVER.items():
        if criterion == "learned" and probe is None:
            continue
        rule, plain, tested = RecurrenceExit(criterion, never), [], []
        for _ in range(repeats):
            plain.append(teacher_forced_nll(model, data, cap).tokens_per_s)
            tested.append(
                teacher_forced_nll(model, data, cap, exit=rule, exit_probe=probe).tokens_per_s
            )
        out[criterion] = max(plain) / max(tested) - 1
        log(f"exit overhead {criterion}: {out[criterion]:+.1%} per loop")
    return out


def confirm(model, data, probe, result: dict, log, rounds: int = CONFIRM_ROUNDS) -> dict:
    """Time the verdict's points again, interleaved, `rounds` times: the best fixed depth and,
    per rule, its fastest point at least as good. Returns {point name: median tokens/s}."""
    best = min(result["fixed"], key=lambda p: p["nll"])
    points = [best, *(r for r in _fastest_as_good(result["rules"], best["nll"]).values() if r)]
    cap = result["fixed"][-1]["depth"]
    speeds: dict[str, list[float]] = {point_name(p, cap): [] for p in points}
    for _ in range(rounds):
        for p in points:
            rule = None if p["kind"] == "fixed" else RecurrenceExit(p["kind"], p["threshold"])
            q = teacher_forced_nll(model, data, p["depth"], exit=rule, exit_probe=probe)
            speeds[point_name(p, cap)].append(q.tokens_per_s)
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    for name, v in speeds.items():
        log(f"confirm {name}: median {medians[name]:.0f} tok/s of {[round(x) for x in v]}")
    return medians


def _fastest_as_good(rules: list[dict], nll: float) -> dict[str, dict | None]:
    """Per rule kind, its fastest point with NLL <= `nll` (None if it has none)."""
    out = {}
    for kind in sorted({r["kind"] for r in rules}):
        ok = [r for r in rules if r["kind"] == kind and r["nll"] <= nll]
        out[kind] = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
    return out


def verdict(result: dict) -> dict:
    """The best fixed depth (lowest NLL); per rule, the fastest point at least as good (any cap)
    and its speed ratio; the oracles' ratios at that NLL; and the issue's bar: a rule at >= 1.3x
    the best fixed depth, or, where the label-blind oracle itself wins less than 1.3x, a rule
    within 10% of the oracle's speed. Speeds of the rules and the best depth: the interleaved
    medians of `confirm` where the result has them."""
    best = min(result["fixed"], key=lambda p: p["nll"])
    cap = result["fixed"][-1]["depth"]
    confirmed = result.get("confirmed", {})
    speed = confirmed.get(point_name(best, cap), best["tokens_per_s"])
    rows = []
    for kind, top in _fastest_as_good(result["rules"], best["nll"]).items():
        top_speed = top and confirmed.get(point_name(top, cap), top["tokens_per_s"])
        rows.append({"rule": kind, "threshold": top and top["threshold"], "cap": top and top["depth"],
                     "speedup_at_best_fixed_nll": top and top_speed / speed})  # fmt: skip
    # the oracles' speeds are the sweep's fixed-depth speeds at their loops: compare them with
    # the sweep's speed of the best depth, not with its re-timing
    swept = best["tokens_per_s"]
    budgeted = result.get("oracle_at_best_fixed", {}).get("tokens_per_s")
    good = [o["tokens_per_s"] for o in result["oracle"] if o["nll"] <= best["nll"]]
    label = max([*good, *([budgeted] if budgeted else [])], default=None)
    # the oracle's trace is a whole-sequence forward (its own h_0 draws): it reaches the best
    # depth's NLL when it matches that depth in the same trace
    blind = [o["tokens_per_s"] for o in result.get("distribution_oracle", [])
             if o["nll"] <= o["nll_at_cap"]]  # fmt: skip
    blind_speedup = max(blind) / swept if blind else None
    rule_speedup = max((r["speedup_at_best_fixed_nll"] or 0 for r in rows), default=0)
    # a rule slower than the fixed depth never counts, however little the oracle wins
    met = rule_speedup >= 1.3 or (
        blind_speedup is not None
        and blind_speedup < 1.3
        and rule_speedup >= max(1.0, 0.9 * blind_speedup)
    )
    return {"best_fixed": {"depth": best["depth"], "nll": best["nll"], "tokens_per_s": speed},
            "rules": rows,
            "label_oracle_speedup_at_best_fixed_nll": label and label / swept,
            "distribution_oracle_speedup_at_best_fixed_nll": blind_speedup,
            "best_rule_speedup": rule_speedup,
            "bar_met": met}  # fmt: skip


def point_name(p: dict, cap: int) -> str:
    if p["kind"] == "fixed":
        return f"fixed T={p['depth']}"
    suffix = "" if p["depth"] == cap else f" (cap {p['depth']})"
    return f"{p['kind']} {p['threshold']:g}{suffix}"


def markdown(result: dict) -> str:
    """The tables bench/RESULTS.md carries."""
    front = {id(p) for p in result["pareto"]}
    cap = result["fixed"][-1]["depth"]
    rows = ["| point | mean loops | NLL | tokens/s | on the front |", "|---|---|---|---|---|"]
    for p in [*result["fixed"], *result["rules"]]:
        rows.append(f"| {point_name(p, cap)} | {p['mean_depth']:.2f} | {p['nll']:.4f} | "
                    f"{p['tokens_per_s']:.0f} | {'yes' if id(p) in front else ''} |")  # fmt: skip
    at = "(fixed-depth speed at its loops)"
    for o in result["oracle"]:
        rows.append(f"| label oracle eps {o['epsilon']} | {o['mean_depth']:.2f} | {o['nll']:.4f} "
                    f"| {o['tokens_per_s']:.0f} {at} | |")  # fmt: skip
    b = result.get("oracle_at_best_fixed")
    if b and b["mean_depth"] is not None:
        rows.append(f"| label oracle at the best fixed NLL | {b['mean_depth']:.2f} | "
                    f"{b['nll']:.4f} | {b['tokens_per_s']:.0f} {at} | |")  # fmt: skip
    for o in result.get("distribution_oracle", []):
        rows.append(f"| distribution oracle KL {o['epsilon']:g} (cap {o['cap']}) | "
                    f"{o['mean_depth']:.2f} | {o['nll']:.4f} | {o['tokens_per_s']:.0f} {at} | |")  # fmt: skip
    overhead = ", ".join(f"{k} {v:+.1%}" for k, v in result["overhead"].items())
    return (
        "\n".join(rows)
        + f"\n\nExit test overhead per loop (never-firing rule vs fixed T=cap): {overhead}\n"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fixed = result["fixed"]
    ax.plot([p["tokens_per_s"] for p in fixed], [p["nll"] for p in fixed], "o-", color="black",
            label="fixed depth T")  # fmt: skip
    for p in fixed:
        ax.annotate(str(p["depth"]), (p["tokens_per_s"], p["nll"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    for kind, marker in (("kl", "s"), ("residual", "^"), ("learned", "D")):
        rows = [r for r in result["rules"] if r["kind"] == kind]
        if rows:
            ax.plot([r["tokens_per_s"] for r in rows], [r["nll"] for r in rows], marker,
                    label=f"exit: {kind}", alpha=0.8)  # fmt: skip
    ax.plot([o["tokens_per_s"] for o in result["oracle"]], [o["nll"] for o in result["oracle"]],
            "*", markersize=12, color="gold", markeredgecolor="black", label="label oracle")  # fmt: skip
    blind = result.get("distribution_oracle", [])
    ax.plot([o["tokens_per_s"] for o in blind], [o["nll"] for o in blind], "P", markersize=8,
            color="tab:purple", label="distribution oracle (KL to the best depth)")  # fmt: skip
    front = result["pareto"]
    ax.plot([p["tokens_per_s"] for p in front], [p["nll"] for p in front], "--", color="grey",
            label="Pareto front")  # fmt: skip
    ax.set_xlabel(f"decode tokens/s ({result['streams']} concurrent streams)")
    ax.set_ylabel("held-out NLL (nats/token)")
    best = min(p["nll"] for p in fixed)
    lowest = min([best, *(o["nll"] for o in [*result["oracle"], *blind])])
    ax.set_ylim(lowest - 0.02, best + 0.25)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/frontier.json")
    parser.add_argument("--png", type=Path, default=ROOT / "bench/frontier.png")
    parser.add_argument("--confirm-only", type=int, metavar="ROUNDS",
                        help="re-time the verdict's points of --out's result this many rounds, "
                        "interleaved, and rewrite its verdict (no sweep)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = args.model or builtin_checkpoint()
    model = load_checkpoint(directory)
    probe = load_exit_probe(directory)
    tok = Tokenizer.from_dir(directory)
    data = heldout_sequences(tok, SKIP_WINDOWS + args.streams, args.tokens + 1)[SKIP_WINDOWS:]
    if args.confirm_only:
        result = json.loads(args.out.read_text())
        result["confirmed"] = confirm(model, data, probe, result, print, args.confirm_only)
        result["verdict"] = verdict(result)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["verdict"], indent=2))
        return
    started = time.time()
    result = measure(model, data, probe, model.cfg.mean_recurrence, print)
    points = [*result["fixed"], *result["rules"]]
    result.update(streams=len(data), tokens=args.tokens, threads=args.threads,
                  model=directory.name, pareto=pareto(points, lambda p: (p["nll"], p["tokens_per_s"])), seconds=round(time.time() - started))  # fmt: skip
    result["confirmed"] = confirm(model, data, probe, result, print)
    result["verdict"] = verdict(result)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.png)
    print(json.dumps(result["verdict"], indent=2))


if __name__ == "__main__":
    main()
