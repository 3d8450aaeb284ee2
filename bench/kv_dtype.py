"""What `--kv-cache-dtype` costs in quality and saves in bytes, on the built-in model.

    python bench/kv_dtype.py [--sequences 32] [--length 256] [--policies per-loop,shared:1]
                             [--out bench/out/kv_dtype.json]

For each KV-cache dtype (float32, float16, bfloat16, fp8 = float8 e4m3) and loop-slot policy:
the teacher-forced held-out NLL decoding through the paged cache (every token of every
sequence through the engine's decode path: pools written rounded, read back) at T = mu_rec and
2 mu_rec, its cost against the float32 cache under the same policy, and the cache's bytes per
token. Held-out text: stdlib files the built-in model never saw (`heldout_sequences`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fast_engine import cpu_name  # noqa: E402
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint  # noqa: E402
from parcae_serve.model.tokenizer import Tokenizer  # noqa: E402
from parcae_serve.server.api.app import KV_CACHE_DTYPES  # noqa: E402
from parcae_serve.server.calibration.calibrate import heldout_sequences  # noqa: E402
from parcae_serve.server.calibration.evaluation import teacher_forced_nll  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16", "fp8"]


def measure(model, data: list[list[int]], policies: list[str]) -> list[dict]:
    rows = []
    mu = model.cfg.mean_recurrence
    for policy in policies:
        for depth in (mu, 2 * mu):
            exact = None
            for name in DTYPES:
                q = teacher_forced_nll(model, data, depth, policy, kv_dtype=KV_CACHE_DTYPES[name])
                exact = exact if exact is not None else q.nll  # float32 comes first
                rows.append({"policy": policy, "depth": depth, "kv_cache_dtype": name,
                             "nll": q.nll, "nll_cost": q.nll / exact - 1,
                             "bytes_per_token": q.cache_bytes_per_token})  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--policies", default="per-loop,shared:1")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/kv_dtype.json")
    args = parser.parse_args()
    model_dir = builtin_checkpoint()
    model = load_checkpoint(model_dir).eval()
    data = heldout_sequences(Tokenizer.from_dir(model_dir), args.sequences, args.length)
    with torch.inference_mode():
        rows = measure(model, data, args.policies.split(","))
    report = {"command": " ".join(sys.argv), "cpu": cpu_name(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| policy | T | KV-cache dtype | held-out NLL | cost vs float32 | bytes/token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['depth']} | {r['kv_cache_dtype']} | {r['nll']:.5f} | "
              f"{r['nll_cost']:+.3%} | {r['bytes_per_token']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
