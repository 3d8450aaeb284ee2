"""Loop-level scheduling of exiting tokens: how long done tokens wait for a shared coda.

    python bench/coda_wait.py [--waits 0,2,4,lockstep] [--thresholds 0.05,0.2] [--rounds 4]

Teacher-forced decode of 32 held-out streams x 48 tokens (the frontier's windows), `residual`
exit rules with cap 12, eager, one kernel thread, under `coda_wait` values of
`teacher_forced_nll`: 0 runs a token's coda in the loop it is done and starts its stream's next
token at the next loop (continuous depth batching); W lets the first done token wait up to W
loops so that tokens done meanwhile share its coda (and their next tokens one prelude);
`lockstep` waits for the batch's slowest token. Fixed T=4 and T=6 run in every round for
reference. Every configuration once per round, rounds interleaved; prints each run and the
medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.frontier import SKIP_WINDOWS  # noqa: E402
from parcae_serve.model.exit_probe import load_exit_probe  # noqa: E402
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint  # noqa: E402
from parcae_serve.model.tokenizer import Tokenizer  # noqa: E402
from parcae_serve.server.calibration.calibrate import heldout_sequences  # noqa: E402
from parcae_serve.server.calibration.evaluation import teacher_forced_nll  # noqa: E402
from parcae_serve.server.engine.sequence import RecurrenceExit  # noqa: E402

CAP = 12
FIXED = (4, 6)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def waits(text: str) -> list[int | None]:
    return [None if x == "lockstep" else int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--waits", type=waits, default=[0, 2, 4, None])
    parser.add_argument("--thresholds", type=floats, default=[0.05, 0.2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    directory = builtin_checkpoint()
    model, probe = load_checkpoint(directory), load_exit_probe(directory)
    windows = heldout_sequences(Tokenizer.from_dir(directory), SKIP_WINDOWS + args.streams,
                                args.tokens + 1)[SKIP_WINDOWS:]  # fmt: skip
    teacher_forced_nll(model, windows, CAP, exit=RecurrenceExit("residual", 0.1))  # warm-up
    speeds: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for threshold in args.thresholds:
            rule = RecurrenceExit("residual", threshold)
            for wait in args.waits:
                q = teacher_forced_nll(model, windows, CAP, exit=rule, exit_probe=probe,
                                       coda_wait=wait)  # fmt: skip
                name = f"residual {threshold:g}, coda wait {'lockstep' if wait is None else wait}"
                speeds.setdefault(name, []).append(q.tokens_per_s)
                print(f"round {r} {name}: {q.tokens_per_s:.0f} tok/s, loops {q.mean_depth:.2f}, "
                      f"nll {q.nll:.4f}", flush=True)  # fmt: skip
        for depth in FIXED:
            q = teacher_forced_nll(model, windows, depth)
            name = f"fixed T={depth}"
            speeds.setdefault(name, []).append(q.tokens_per_s)
            print(f"round {r} {name}: {q.tokens_per_s:.0f} tok/s, nll {q.nll:.4f}", flush=True)
    print("\n| configuration | median tok/s | runs |\n|---|---|---|")
    for name, values in speeds.items():
        print(
            f"| {name} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |"
        )


if __name__ == "__main__":
    main()
