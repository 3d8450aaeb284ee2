"""Train the learned exit probe (model/exit_probe.py) on a frozen checkpoint's held-out text, and
measure the oracle exit: the best any per-token exit rule could do on this model.

Both read per-token, per-loop losses from a whole-sequence forward at the cap depth with the coda
applied after every loop (the states are those decode computes under the exact per-loop cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from parcae_serve.model.exit_probe import ExitProbe
from parcae_serve.model.parcae import CausalContext, Parcae


@dataclass
class LoopTrace:
    """Per token (N) and loop t = 1..cap: the state after the loop, and the token's NLL had it
    stopped there."""

    states: Tensor  # (cap + 1, N, d): h_0 .. h_cap
    nll: Tensor  # (cap, N): NLL after loop t (row t - 1)


@torch.no_grad()
def trace_loops(model: Parcae, sequences: list[list[int]], cap: int, seed: int = 0) -> LoopTrace:
    """Run every sequence to `cap` loops, reading the coda after each loop."""
    g = torch.Generator().manual_seed(seed)
    states, nlls = [], []
    for tokens in sequences:
        ids = torch.tensor([tokens[:-1]])
        target = torch.tensor(tokens[1:])
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rots, ctx = model.rotations(positions), CausalContext()
        e = model.prelude(ids, rots, ctx)
        prepared = model.transformer["adapter"].prepare(e)
        h = model.initial_state(1, ids.shape[1], [g], e)
        seq_states, seq_nll = [h[0].float()], []
        for t in range(cap):
            h = model.core(h, prepared, ids, rots, ctx, t)
            logits = model.coda(h, ids, rots, ctx)[0]
            seq_states.append(h[0].float())
            seq_nll.append(F.cross_entropy(logits, target, reduction="none"))
        states.append(torch.stack(seq_states))
        nlls.append(torch.stack(seq_nll))
    return LoopTrace(torch.cat(states, dim=1), torch.cat(nlls, dim=1))


def done_labels(nll: Tensor, epsilon: float) -> Tensor:
    """(cap, N) bool: after loop t no later loop (up to the cap) lowers the NLL by > epsilon."""
    later_best = torch.flip(torch.cummin(torch.flip(nll, [0]), dim=0).values, [0])
    # later_best[t] = min over loops >= t; compare with loops strictly after t
    after = torch.cat([later_best[1:], torch.full_like(nll[:1], float("inf"))])
    return after >= nll - epsilon


def oracle(trace: LoopTrace | Tensor, epsilon: float) -> dict:
    """Per token, the smallest depth whose NLL is within `epsilon` of its NLL at the cap: the
    frontier point no exit rule can beat (it sees the future). From a trace, or from a
    (cap, N) tensor of per-token NLL at each depth 1..cap."""
    nll = trace.nll if isinstance(trace, LoopTrace) else trace
    ok = nll <= nll[-1:] + epsilon
    first = ok.float().argmax(dim=0)  # the first loop index (0-based) that is ok
    picked = nll.gather(0, first.unsqueeze(0))[0]
    return {"epsilon": epsilon, "mean_depth": float(first.float().mean() + 1),
            "nll": float(picked.mean()), "nll_at_cap": float(nll[-1].mean()),
            "cap": nll.shape[0]}  # fmt: skip


def train_exit_probe(
    model: Parcae, trace: LoopTrace, epsilon: float, steps: int = 400, seed: int = 0
) -> tuple[ExitProbe, dict]:
    """Logistic regression on every (token, loop) of the trace; returns the probe and its
    training report (accuracy, base rate)."""
    torch.manual_seed(seed)
    cap = trace.nll.shape[0]
    probe = ExitProbe(trace.states.shape[-1], model.cfg.mean_recurrence, epsilon, cap)
    labels = done_labels(trace.nll, epsilon).float()
    x = torch.cat([probe.features(trace.states[t], trace.states[t + 1], t + 1) for t in range(cap)])
    y = labels.reshape(-1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe.linear(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.sigmoid(probe.linear(x).squeeze(-1))
    report = {"examples": len(y), "done_rate": float(y.mean()), "bce": float(loss.detach()),
              "accuracy": float(((p > 0.5).float() == y).float().mean())}  # fmt: skip
    return probe.eval(), report
