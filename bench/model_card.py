"""Write the built-in model's card (README.md) from its training and calibration records.

    python bench/model_card.py [--model DIR]

Reads DIR/training.json (written by `python -m parcae_serve.model.train`) and DIR/calibration.json (written by
`parcae calibrate`), and links DIR/depth_curve.png (written by bench/depth_curve.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parcae_serve.model.loading import builtin_checkpoint  # noqa: E402


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def card(directory: Path) -> str:
    train = json.loads((directory / "training.json").read_text())
    cal_path = directory / "calibration.json"
    cal = json.loads(cal_path.read_text()) if cal_path.exists() else None
    cfg = json.loads((directory / "config.json").read_text())
    s = train["settings"]
    mu = cfg["mean_recurrence"]
    # older runs evaluated one context (256 tokens) only
    by_context = train.get("loss_by_depth_and_context") or {"256": train["loss_by_depth"]}
    contexts = list(by_context)
    depths = list(by_context[contexts[0]])
    t1 = {c: by_context[c]["1"] for c in contexts}
    rows = [[t, *(f"{by_context[c][t]:.4f} ({(by_context[c][t] / t1[c] - 1) * 100:+.1f}%)"
                  for c in contexts)] for t in depths]  # fmt: skip
    fit = train["fit"]
    trained = contexts[-1]
    at = by_context[trained]
    longest = by_context[contexts[-1]] if contexts[-1] != "256" else None
    checks = [
        ("T=mu at least 8% below T=1", at[str(mu)] <= 0.92 * at["1"],
         f"{(at[str(mu)] / at['1'] - 1) * 100:+.1f}%"),
        ("T=2mu within 0.5% of T=mu", at[str(2 * mu)] <= 1.005 * at[str(mu)],
         f"{(at[str(2 * mu)] / at[str(mu)] - 1) * 100:+.2f}%"),
        ("T=4mu within 0.5% of T=mu", at[str(4 * mu)] <= 1.005 * at[str(mu)],
         f"{(at[str(4 * mu)] / at[str(mu)] - 1) * 100:+.2f}%"),
    ]  # fmt: skip
    if longest is not None:
        checks.append((f"context {trained} no worse per token than 256 (T=mu)",
                       at[str(mu)] <= by_context["256"][str(mu)],
                       f"{at[str(mu)]:.4f} vs {by_context['256'][str(mu)]:.4f}"))  # fmt: skip
    parts = [
        f"# {directory.name}: the built-in Parcae model",
        "",
        f"A {cfg['n_layers_in_prelude']}/{cfg['n_layers_in_recurrent_block']}/"
        f"{cfg['n_layers_in_coda']} (prelude/recurrent/coda) Parcae, d={cfg['n_embd']}, "
        f"{cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}, context "
        f"{cfg['block_size']}, diagonal injection, value embeddings on every layer, qk-norm, ReLU² "
        f"MLP, mean_recurrence {mu}. Trained by this repository on the CPU; it writes "
        "Python-flavoured text, and exists so the server serves out of the box and so the depth "
        "knob can be measured, not to be useful.",
        "",
        "## Training",
        f"- `python -m parcae_serve.model.train --minutes {s['minutes']}` on 2 CPU cores: "
        f"{train['steps']} steps, {train['train_tokens']:,} tokens, {train['minutes']} minutes.",
        f"- Corpus: the `.py` files of the running interpreter's standard library, split by file: "
        f"{train['train_files']} train files, {train['heldout_files']} held-out files.",
        f"- Tokenizer: byte-level BPE, {s['vocab']} tokens, trained on the train split; "
        "`<|bos|>`/`<|eos|>`/`<|pad|>` are ids 0/1/2 and every document starts with BOS "
        "(tokenizer.json adds BOS, tokenizer_config.json names them, as Hugging Face tools expect).",
        depth_sampling(s),
        f"- Weights stored in bfloat16 ({(directory / 'model.safetensors').stat().st_size / 1e6:.1f} MB).",
        "",
        "## Held-out loss by depth",
        f"Next-token NLL (nats) on {train['heldout_tokens']:,} held-out tokens, whole-sequence "
        "forward from the shipped bf16 weights in float32, the same tokens cut into windows of "
        f"each context length (vs T=1 in brackets):",
        "",
        table(["T (loops)", *(f"context {c}" for c in contexts)], rows),
        "",
        f"Fit of the paper's saturating law L(T) = L_inf + Z·exp(−z·T) (context {trained}): "
        f"L_inf = {fit['L_inf']:.4f}, Z = {fit['Z']:.4f}, z = {fit['z']:.4f}.",
        "",
        table(
            ["check (context " + trained + ")", "holds", "measured"],
            [[name, "yes" if ok else "**no**", value] for name, ok, value in checks],
        ),
    ]
    if cal:
        parts += calibration_section(cal, directory)
    return "\n".join(parts) + "\n"


def depth_sampling(s: dict) -> str:
    if "depth_sigma" in s:  # per-sequence sampling (model.train since v2)
        windows = f"Windows of {s['seq']} tokens, batch {s['batch']}."
        if "short_seq" in s and float(s["long_fraction"]) < 1:
            windows = (f"Length curriculum: windows of {s['short_seq']} tokens, batch "
                       f"{s['short_batch']}, then for the last {float(s['long_fraction']):.0%} of the "
                       f"time windows of {s['seq']} tokens (the served context), batch {s['batch']}.")  # fmt: skip
        tail = ""
        if float(s.get("deep_fraction", 0)) > 0:
            tail = (f", except {float(s['deep_fraction']):.0%} of sequences drawn uniformly from "
                    f"[{s['mu_rec']}, {s['max_depth']}] (a deep tail)")  # fmt: skip
        settle = ""
        if float(s.get("settle_weight", 0)) > 0:
            settle = (f" Settling penalty: {float(s['settle_weight']):g} x the last loop's relative "
                      f"state change |h_T - h_T-1|^2 / |h_T|^2 of sequences at least "
                      f"{s['mu_rec']} deep, added to the loss, so the state converges instead of "
                      "drifting with more loops.")  # fmt: skip
        return (f"- {windows} Depth drawn per sequence from a log-normal Poisson (mean "
                f"{s['mu_rec']}, sigma {s['depth_sigma']}, Huginn's sampler), clipped to "
                f"[1, {s['max_depth']}]{tail}; gradients through the last {s['backprop_depth']} "
                f"loops; AdamW lr {s['lr']}, cosine schedule on wall time.{settle}")  # fmt: skip
    return (f"- Windows of {s['seq']} tokens, batch {s['batch']}. Depth drawn per step: "
            f"T ~ Poisson({s['mu_rec']}) (at least 1, at most {s['max_depth']}), gradients through "
            f"the last {s['backprop_depth']} loops; AdamW lr {s['lr']}, cosine schedule on wall "
            "time. (Trained by an earlier version of model/train.py, before per-sequence depth "
            "and 1024-token windows.)")  # fmt: skip


def calibration_section(cal: dict, directory: Path) -> list[str]:
    fixed = [[t, f"{v:.4f}", f"{cal['tokens_per_s_by_depth'][t]:.0f}"]
             for t, v in cal["loss_by_depth"].items()]  # fmt: skip
    adaptive = [
        [r["criterion"], f"{r['threshold']:g}", f"{r['mean_depth']:.2f}", f"{r['nll']:.4f}",
         f"{r['nll_vs_fixed_cap'] * 100:+.2f}%", f"{r['loops_vs_fixed_cap'] * 100:.0f}%"]
        for r in cal["adaptive"]
    ]  # fmt: skip
    best = cal.get("best_adaptive")
    verdict = (
        f"Best adaptive setting within 1% of fixed T={best['depth']}: `{best['criterion']}` at "
        f"{best['threshold']:g}, NLL {best['nll_vs_fixed_cap'] * 100:+.2f}% with "
        f"{best['loops_vs_fixed_cap'] * 100:.0f}% of the loops."
        if best
        else "No exit setting reached NLL within 1% of the fixed cap; the table shows the trade-off."
    )
    fit = cal["fit"]
    lines = [
        "",
        "## Compute-quality curve (serving path)",
        f"`parcae calibrate`: teacher-forced decode through the server's own cache ({cal['policy']}),"
        f" {cal['heldout_tokens']:,} held-out tokens. Fit: L_inf = {fit['L_inf']:.4f}, "
        f"Z = {fit['Z']:.4f}, z = {fit['z']:.4f}.",
        "",
        table(["T", "NLL", "decode tok/s"], fixed),
        "",
        "Adaptive exit (cap T = 2·mean_recurrence, min_depth 1):",
        "",
        table(
            ["criterion", "threshold", "mean loops", "NLL", "vs fixed cap", "loops vs cap"],
            adaptive,
        ),
        "",
        verdict,
    ]
    if "oracle" in cal:
        o, probe = cal["oracle"], cal.get("exit_probe", {})
        lines += ["", f"Oracle exit (per token the smallest depth within {o['epsilon']} nats of "
                  f"its loss at T={o['cap']}; whole-sequence forward): {o['mean_depth']:.2f} mean "
                  f"loops, NLL {o['nll']:.4f} (at the cap {o['nll_at_cap']:.4f}). The `learned` "
                  f"rows use the exit probe (exit_probe.safetensors) trained on "
                  f"{probe.get('sequences', '?')} other held-out windows: accuracy "
                  f"{probe.get('accuracy', 0):.3f}, {probe.get('done_rate', 0):.1%} of (token, "
                  "loop) pairs already done."]  # fmt: skip
    if "distribution_oracle" in cal:
        b = cal["distribution_oracle"]
        lines += ["", f"The oracle exit above reads the label: it picks, per token, whichever "
                  f"depth happens to score the actual next token well. The label-blind bound, per token the "
                  f"first loop whose next-token distribution is within KL {b['epsilon']} of "
                  f"T={b['cap']}'s: {b['mean_depth']:.2f} mean loops, NLL {b['nll']:.4f} (at the "
                  f"cap {b['nll_at_cap']:.4f})."]  # fmt: skip
    if "kv_policies" in cal:
        kv = cal["kv_policies"]
        rows = [[r["policy"], str(r["depth"]), f"{r['nll']:.4f}", f"{r['nll_cost'] * 100:+.2f}%",
                 f"{r['bytes_per_token']:,}"] for r in kv["rows"]]  # fmt: skip
        rec = kv["recommended"]
        lines += ["", "## KV-cache loop-slot policies (calibration)",
                  "Teacher-forced decode through the cache; cost vs per-loop (exact):", "",
                  table(["policy", "T", "NLL", "cost", "bytes/token"], rows), "",
                  f"`--kv-policy auto` picks `{rec['policy']}`: {rec['reason']}."]  # fmt: skip
    if (directory / "depth_curve.png").exists():
        lines += ["", "![compute vs quality](depth_curve.png)"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    directory = args.model or builtin_checkpoint()
    (directory / "README.md").write_text(card(directory))
    print(f"wrote {directory / 'README.md'}")


if __name__ == "__main__":
    main()
