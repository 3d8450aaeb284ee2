"""Exit-test overhead: the share of each loop spent on the vectorised exit test: time inside ModelRunner._state_exits
against the rest of ModelRunner.loop, teacher-forced decode of 32 held-out streams x 48 tokens on
the built-in model, depth cap 12, rules that never fire (so every row runs every loop and pays
the test every loop).

    python bench/exit_overhead.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)
from frontier import SKIP_WINDOWS

from parcae_serve.model.exit_probe import load_exit_probe
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint
from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.server.calibration.calibrate import heldout_sequences
from parcae_serve.server.calibration.evaluation import teacher_forced_nll
from parcae_serve.server.engine import runner as R
from parcae_serve.server.engine.sequence import RecurrenceExit

spent = {"loop": 0.0, "exit": 0.0}


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        spent[name] += time.perf_counter() - t
        return out

    return wrapper


R.ModelRunner.loop = timed("loop", R.ModelRunner.loop)
R.ModelRunner._state_exits = timed("exit", R.ModelRunner._state_exits)
d = builtin_checkpoint()
m = load_checkpoint(d)
p = load_exit_probe(d)
data = heldout_sequences(Tokenizer.from_dir(d), SKIP_WINDOWS + 32, 49)[SKIP_WINDOWS:]
for crit, never in (("residual", 0.0), ("learned", 1.0), ("residual", 0.0), ("learned", 1.0)):
    spent.update(loop=0.0, exit=0.0)
    teacher_forced_nll(m, data, 12, exit=RecurrenceExit(crit, never), exit_probe=p)
    print(
        f"{crit}: exit test {spent['exit'] / (spent['loop'] - spent['exit']):.1%} of a loop's cost "
        f"({spent['exit'] * 1e3:.0f} ms of {spent['loop'] * 1e3:.0f} ms in loops)"
    )
