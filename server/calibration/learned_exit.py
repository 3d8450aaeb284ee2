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
    kl: Tensor | None = None  # (cap, N): KL(p_cap || p_t), next-token distributions


@torch.no_grad()
def trace_loops(model: Parcae, sequences: list[list[int]], cap: int, seed: int = 0) -> LoopTrace:
    """Run every sequence to `cap` loops, reading the coda after each loop."""
    g = torch.Generator().manual_seed(seed)
    states, nlls, kls = [], [], []
    for tokens in sequences:
        ids = torch.tensor([tokens[:-1]])
        target = torch.tensor(tokens[1:])
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rots, ctx = model.rotations(positions), CausalContext()
        e = model.prelude(ids, rots, ctx)
        prepared = model.transformer["adapter"].prepare(e)
        h = model.initial_state(1, ids.shape[1], [g], e)
        seq_states, seq_logprobs = [h[0].float()], []
        for t in range(cap):
            h = model.core(h, prepared, ids, rots, ctx, t)
            seq_states.append(h[0].float())
            seq_logprobs.append(torch.log_softmax(model.coda(h, ids, rots, ctx)[0].float(), -1))
        logprobs = torch.stack(seq_logprobs)  # (cap, L, vocab): one sequence's, then dropped
        states.append(torch.stack(seq_states))
        nlls.append(-logprobs.gather(2, target.expand(cap, -1).unsqueeze(2)).squeeze(2))
        final = logprobs[-1]
        kls.append((final.exp() * (final - logprobs)).sum(-1))
    return LoopTrace(torch.cat(states, dim=1), torch.cat(nlls, dim=1), torch.cat(kls, dim=1))


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
    return exit_at_first(nll, nll <= nll[-1:] + epsilon, epsilon)


def distribution_oracle(trace: LoopTrace, epsilon: float) -> dict:
    """Per token, the first loop whose next-token distribution is within KL `epsilon` of the
    cap's: an exit that sees the future (the cap's distribution) but not the label, so it bounds
    what a rule can win without exploiting per-token label noise. (The label-reading `oracle`
    and `oracle_at_nll` pick, per token, whichever depth happens to score the actual next token
    best, and so reach the cap's NLL in far fewer loops than any causal rule could.)"""
    if trace.kl is None:
        raise ValueError("the trace has no KL to the cap (trace_loops records it)")
    ok = trace.kl <= epsilon
    ok[-1] = True  # the cap's own distribution
    return exit_at_first(trace.nll, ok, epsilon)


def exit_at_first(nll: Tensor, ok: Tensor, epsilon: float) -> dict:
    """Every token (column) stops at its first loop where `ok` (cap, N) holds (the cap if none):
    {"epsilon", "mean_depth", "nll" of the picks, "nll_at_cap", "cap"}."""
    first = ok.float().argmax(dim=0)  # the first loop index (0-based) that is ok
    picked = nll.gather(0, first.unsqueeze(0))[0]
    return {"epsilon": epsilon, "mean_depth": float(first.float().mean() + 1),
            "nll": float(picked.mean()), "nll_at_cap": float(nll[-1].mean()),
            "cap": nll.shape[0]}  # fmt: skip


def oracle_at_nll(nll: Tensor, target: float, iterations: int = 40) -> dict:
    """A per-token depth choice with mean NLL <= `target` in few mean loops, from a (cap, N)
    tensor of per-token NLL at each depth 1..cap: for a price `lam` per loop every token takes
    argmin_d nll[d] + lam * d (the Lagrangian of the budgeted choice), `lam` bisected to the
    largest price that still meets `target`. A point of the choice's convex hull, so the true
    fewest loops can be slightly lower. Like `oracle` it reads the labels: no rule can do it.
    Returns {"target", "mean_depth", "nll", "cap"}; mean_depth is None when even the per-token
    best depth misses `target`."""
    cap, nll = nll.shape[0], nll.double()
    loops = torch.arange(1, cap + 1, dtype=nll.dtype).unsqueeze(1)
    target_met = target + 1e-6 * abs(target)  # a fixed depth's own mean, summed otherwise

    def choose(lam: float) -> tuple[float, float]:
        pick = (nll + lam * loops).argmin(dim=0)
        return float(nll.gather(0, pick.unsqueeze(0)).mean()), float(pick.float().mean() + 1)

    best_nll, _ = choose(0.0)
    if best_nll > target_met:
        return {"target": target, "mean_depth": None, "nll": best_nll, "cap": cap}
    low, high = 0.0, float(nll.max() - nll.min()) + 1.0  # at `high` every token takes depth 1
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if choose(mid)[0] <= target_met else (low, mid)
    got, depth = choose(low)
    return {"target": target, "mean_depth": depth, "nll": got, "cap": cap}


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
