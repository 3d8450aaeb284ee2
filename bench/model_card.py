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
    loss = train["loss_by_depth"]
    t1 = loss["1"]
    rows = [[t, f"{v:.4f}", f"{(v / t1 - 1) * 100:+.1f}%"] for t, v in loss.items()]
    fit = train["fit"]
    parts = [
        f"# {directory.name}: the built-in Parcae model",
        "",
        f"A {cfg['n_layers_in_prelude']}/{cfg['n_layers_in_recurrent_block']}/"
        f"{cfg['n_layers_in_coda']} (prelude/recurrent/coda) Parcae, d={cfg['n_embd']}, "
        f"{cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}, diagonal injection, "
        f"value embeddings on every layer, qk-norm, ReLU² MLP, mean_recurrence {mu}. Trained by "
        "this repository on the CPU; it writes Python-flavoured text, and exists so the server "
        "serves out of the box and so the depth knob can be measured, not to be useful.",
        "",
        "## Training",
        f"- `python -m parcae_serve.model.train --minutes {s['minutes']}` on 2 CPU cores: {train['steps']} steps, "
        f"{train['train_tokens']:,} tokens, {train['minutes']} minutes.",
        f"- Corpus: the `.py` files of the running interpreter's standard library, split by file: "
        f"{train['train_files']} train files, {train['heldout_files']} held-out files.",
        f"- Tokenizer: byte-level BPE, {s['vocab']} tokens, trained on the train split; "
        "`<|bos|>`/`<|eos|>`/`<|pad|>` are ids 0/1/2 and every document starts with BOS.",
        f"- Depth sampling as in the paper: per step T ~ Poisson({s['mu_rec']}) (at least 1, at "
        f"most {s['max_depth']}), gradients through the last {s['backprop_depth']} loops only; "
        f"AdamW lr {s['lr']}, batch {s['batch']}×{s['seq']} tokens, cosine schedule on wall time.",
        f"- Weights stored in bfloat16 ({(directory / 'model.safetensors').stat().st_size / 1e6:.1f} MB).",
        "",
        "## Held-out loss by depth",
        f"Next-token NLL (nats) on {train['heldout_tokens']:,} held-out tokens, whole-sequence "
        "forward, float32:",
        "",
        table(["T (loops)", "NLL", "vs T=1"], rows),
        "",
        f"Fit of the paper's saturating law L(T) = L_inf + Z·exp(−z·T): L_inf = {fit['L_inf']:.4f}, "
        f"Z = {fit['Z']:.4f}, z = {fit['z']:.4f}.",
    ]
    if cal:
        parts += calibration_section(cal, directory)
    return "\n".join(parts) + "\n"


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
