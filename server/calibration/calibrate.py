"""Compute-quality curve of a checkpoint: held-out NLL and speed for fixed depths and exit rules.

    parcae calibrate --model DIR        (or: python -m parcae_serve.server.calibration.calibrate --model DIR)

Trains the learned exit probe (server/calibration/learned_exit.py) on held-out windows the
evaluation does not use, measures the oracle exit, then fixed T = 1 ... 4*mu_rec and a sweep
of `kl` / `residual` / `learned` exit thresholds, each measured by
teacher-forced decode through the serving path (`parcae_serve.server.calibration.evaluation`). Fits the paper's
L(T) = L_inf + Z exp(-z T) and writes `calibration.json` (then `exit_probe.safetensors`) next
to the checkpoint, which the server publishes in /v1/models (and `auto` exits choose from). Also measures each candidate KV loop-slot policy's NLL cost
against per-loop and its cache bytes per token at T = mu_rec and 2*mu_rec (decoding through
the cache), which `--kv-policy auto` chooses from; `--kv-policies-only` measures just those
and updates an existing file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from parcae_serve.model.depth_curve import fit_saturating_law
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint
from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.model.train import is_heldout, read_texts, stdlib_files
from parcae_serve.server.calibration.evaluation import teacher_forced_nll
from parcae_serve.server.calibration.learned_exit import (
    distribution_oracle,
    oracle,
    trace_loops,
    train_exit_probe,
)
from parcae_serve.server.engine.kv_cache import choose_policy
from parcae_serve.server.engine.sequence import RecurrenceExit

THRESHOLDS = {
    "kl": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1],
    "residual": [0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3],
    "learned": [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
}
EXIT_EPSILON = 0.01  # nats: "more loops would not help" (probe labels, oracle)
ORACLE_KL = 0.01  # nats of KL to the cap's distribution: the label-blind oracle's "done"
PROBE_SEQUENCES = 48  # held-out windows the probe trains on (disjoint from the evaluation's)


def heldout_sequences(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens from the stdlib files the built-in model never saw."""
    texts = read_texts([p for p in stdlib_files() if is_heldout(p, 0.05)])
    out: list[list[int]] = []
    for text in texts:
        ids = tokenizer.encode(text)
        for start in range(0, len(ids) - length, length * 4):
            out.append(ids[start : start + length])
            if len(out) == count:
                return out
    return out


KV_POLICIES = ["shared:1", "shared:2", "first:2", "last:2"]


def kv_policy_table(model, data: list[list[int]], mu: int, bound: float = 0.005, log=print) -> dict:
    """Each candidate policy's held-out NLL cost vs per-loop and its bytes per token at
    T = mu and 2*mu, decoding through the cache; `recommended`: what `--kv-policy auto` picks
    with the default bound."""
    rows = []
    for depth in (mu, 2 * mu):
        exact = teacher_forced_nll(model, data, depth, "per-loop")
        for policy in ["per-loop", *KV_POLICIES]:
            q = exact if policy == "per-loop" else teacher_forced_nll(model, data, depth, policy)
            cost = q.nll / exact.nll - 1
            rows.append({"policy": policy, "depth": depth, "nll": round(q.nll, 5),
                         "nll_cost": round(cost, 5),
                         "bytes_per_token": int(q.cache_bytes_per_token)})  # fmt: skip
            log(f"kv {policy:9s} T={depth:2d} nll {q.nll:.4f} ({cost:+.2%}) "
                f"{q.cache_bytes_per_token:.0f} B/token")  # fmt: skip
    table = {"depths": [mu, 2 * mu], "baseline": "per-loop", "rows": rows}
    policy, reason = choose_policy({"kv_policies": table}, bound, mu)
    table["recommended"] = {"policy": str(policy), "max_depth": policy.upto or None,
                            "bound": bound, "reason": reason}  # fmt: skip
    return table


def fixed_depths(mu: int) -> list[int]:
    return sorted({1, 2, 3, 4, mu, 2 * mu, 3 * mu, 4 * mu} | set(range(1, mu + 1)))


def calibrate(
    model_dir: str | None = None,
    out: str | None = None,
    sequences: int = 16,
    length: int = 128,
    policy: str = "per-loop",
    log=print,
    kv_policies_only: bool = False,
) -> dict:
    directory = Path(model_dir) if model_dir else builtin_checkpoint()
    path = Path(out) if out else directory / "calibration.json"
    torch.manual_seed(0)
    model = load_checkpoint(directory)
    data = heldout_sequences(Tokenizer.from_dir(directory), sequences, length)
    mu = model.cfg.mean_recurrence
    if kv_policies_only:
        report = json.loads(path.read_text()) if path.exists() else {"model": directory.name}
        report["kv_policies"] = kv_policy_table(model, data, mu, log=log)
        path.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {path}")
        return report
    fixed = {}
    for depth in fixed_depths(mu):
        fixed[depth] = teacher_forced_nll(model, data, depth, policy).summary()
        log(f"T={depth:3d} nll {fixed[depth]['nll']:.4f} {fixed[depth]['tokens_per_s']:.0f} tok/s")
    fit = fit_saturating_law(list(fixed), [r["nll"] for r in fixed.values()])
    cap = 2 * mu
    probe, probe_report = fit_probe(model, directory, sequences, length, cap, log)
    trace = trace_loops(model, data, cap)
    exit_oracle = oracle(trace, EXIT_EPSILON)
    blind_oracle = distribution_oracle(trace, ORACLE_KL)
    for name, o in (("oracle", exit_oracle), ("distribution oracle", blind_oracle)):
        log(f"{name} (eps {o['epsilon']}): depth {o['mean_depth']:.2f} nll {o['nll']:.4f}")
    adaptive = []
    for criterion, thresholds in THRESHOLDS.items():
        for threshold in thresholds:
            rule = RecurrenceExit(criterion, threshold, min_depth=1)
            row = teacher_forced_nll(model, data, cap, policy, rule, exit_probe=probe).summary()
            row.update(criterion=criterion, threshold=threshold, depth=cap)
            row["nll_vs_fixed_cap"] = row["nll"] / fixed[cap]["nll"] - 1
            row["loops_vs_fixed_cap"] = row["mean_depth"] / cap
            adaptive.append(row)
            log(f"{criterion} {threshold:g}: nll {row['nll']:.4f} depth {row['mean_depth']:.2f}")
    report = {
        "model": directory.name,
        "policy": policy,
        "heldout_tokens": sum(len(s) - 1 for s in data),
        "loss_by_depth": {str(d): round(r["nll"], 4) for d, r in fixed.items()},
        "tokens_per_s_by_depth": {str(d): round(r["tokens_per_s"], 1) for d, r in fixed.items()},
        "fit": fit,
        "adaptive": adaptive,
        "best_adaptive": best_adaptive(adaptive),
        "oracle": exit_oracle,
        "distribution_oracle": blind_oracle,
        "exit_probe": probe_report,
        "kv_policies": kv_policy_table(model, data, mu, log=log),
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    probe.save(path.parent)  # last, beside the table its `learned` rows were measured with
    log(f"wrote {path} and {path.parent / 'exit_probe.safetensors'}")
    return report


def fit_probe(model, directory: Path, skip: int, length: int, cap: int, log) -> tuple:
    """Train the learned exit probe on held-out windows after the evaluation's `skip`."""
    windows = heldout_sequences(Tokenizer.from_dir(directory), skip + PROBE_SEQUENCES, length)
    probe, report = train_exit_probe(model, trace_loops(model, windows[skip:], cap), EXIT_EPSILON)
    log(f"exit probe: {report}")
    return probe, {**report, "epsilon": EXIT_EPSILON, "cap": cap, "sequences": len(windows) - skip}


def best_adaptive(rows: list[dict], nll_tolerance: float = 0.01) -> dict | None:
    """The cheapest exit rule within `nll_tolerance` of fixed T = 2*mu_rec."""
    ok = [r for r in rows if r["nll_vs_fixed_cap"] <= nll_tolerance]
    return min(ok, key=lambda r: r["mean_depth"]) if ok else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--out", help="output file (default: DIR/calibration.json)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--policy", default="per-loop")
    parser.add_argument(
        "--kv-policies-only",
        action="store_true",
        help="measure only the KV policies' table and update it in the existing file",
    )
    args = parser.parse_args()
    calibrate(args.model, args.out, args.sequences, args.length, args.policy,
              kv_policies_only=args.kv_policies_only)  # fmt: skip


if __name__ == "__main__":
    main()
