"""Plot a checkpoint's compute-quality curve (needs matplotlib, a bench-only dependency).

    python bench/depth_curve.py [--model DIR] [--out DIR/depth_curve.png]

Reads `calibration.json` (written by `parcae calibrate`): held-out NLL against loops per token
for fixed depths (with the fitted L(T) = L_inf + Z exp(-z T)) and for each exit rule.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parcae_serve.model.loading import builtin_checkpoint  # noqa: E402


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    directory = args.model or builtin_checkpoint()
    cal = json.loads((directory / "calibration.json").read_text())
    depths = [int(d) for d in cal["loss_by_depth"]]
    losses = list(cal["loss_by_depth"].values())
    fit = cal["fit"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(depths, losses, "o", color="black", label="fixed depth T")
    grid = [1 + i * (max(depths) - 1) / 200 for i in range(201)]
    ax.plot(
        grid,
        [fit["L_inf"] + fit["Z"] * math.exp(-fit["z"] * t) for t in grid],
        "-",
        color="gray",
        label=f"fit: {fit['L_inf']:.3f} + {fit['Z']:.3f}·exp(-{fit['z']:.3f}·T)",
    )
    for criterion, marker in (("kl", "s"), ("residual", "^"), ("learned", "D")):
        rows = [r for r in cal["adaptive"] if r["criterion"] == criterion]
        if not rows:
            continue
        ax.plot(
            [r["mean_depth"] for r in rows],
            [r["nll"] for r in rows],
            marker,
            alpha=0.8,
            label=f"adaptive exit ({criterion}), cap T={rows[0]['depth']}",
        )
    if "oracle" in cal:
        o = cal["oracle"]
        ax.plot([o["mean_depth"]], [o["nll"]], "*", markersize=12, color="gold",
                markeredgecolor="black", label=f"oracle exit (eps {o['epsilon']}, cap {o['cap']})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops per token (mean)")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_title(f"{cal['model']}: compute vs quality ({cal['heldout_tokens']} held-out tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = args.out or directory / "depth_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
