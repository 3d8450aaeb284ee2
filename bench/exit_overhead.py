"""Exit-test overhead: the time inside ModelRunner._state_exits (the vectorised residual / learned
test) against the rest of ModelRunner.loop, teacher-forced decode of 32 held-out streams x 48
tokens on the built-in model, cap 12, with rules that never fire (so every row runs every loop
and pays the test every loop).

    python bench/exit_overhead.py
"""

from __future__ import annotations

import sys
import time
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
from parcae_serve.server.engine.runner import ModelRunner  # noqa: E402
from parcae_serve.server.engine.sequence import RecurrenceExit  # noqa: E402

NEVER = (("residual", 0.0), ("learned", 1.0))


def timed(spent: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - started

    return wrapper


def main() -> None:
    torch.set_num_threads(1)
    spent = {"loop": 0.0, "exit": 0.0}
    ModelRunner.loop = timed(spent, "loop", ModelRunner.loop)
    ModelRunner._state_exits = timed(spent, "exit", ModelRunner._state_exits)
    directory = builtin_checkpoint()
    model, probe = load_checkpoint(directory), load_exit_probe(directory)
    data = heldout_sequences(Tokenizer.from_dir(directory), SKIP_WINDOWS + 32, 49)[SKIP_WINDOWS:]
    teacher_forced_nll(model, data, 12)  # warm-up
    for criterion, never in NEVER * 2:
        spent.update(loop=0.0, exit=0.0)
        teacher_forced_nll(model, data, 12, exit=RecurrenceExit(criterion, never), exit_probe=probe)
        share = spent["exit"] / (spent["loop"] - spent["exit"])
        print(f"{criterion}: exit test {share:.1%} of a loop's cost "
              f"({spent['exit'] * 1e3:.0f} ms of {spent['loop'] * 1e3:.0f} ms in loops)")  # fmt: skip


if __name__ == "__main__":
    main()
