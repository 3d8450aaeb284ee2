"""Self-speculative decoding: a looped model drafts with its own first loops.

A round for a sequence decoding at depth T with speculation (d, k), whose last token sits at
position p:

1. Draft: k one-token steps at depth d (positions p .. p+k-1, the decode graphs of depth d,
   batched over every speculating sequence); each step's coda proposes the next token (greedy:
   its argmax; sampling: a draw from the draft distribution q).
2. Verify: the k positions continue from their states after d loops through loops d..T-1 and the
   coda as one causal chunk (`verify_graph`): loops 0..d-1 of a drafted position are exactly
   what depth T runs, so they are not run again. This gives the depth-T distributions p.
3. Accept the longest prefix of drafts that depth T agrees with. Greedy: the draft is depth T's
   argmax. Sampling: speculative rejection sampling (Leviathan et al. 2023, arXiv 2211.17192;
   Chen et al. 2023, arXiv 2302.01318): keep draft x with probability min(1, p(x) / q(x)); at the
   first rejection draw from norm(max(0, p - q)). Either way the output is distributed exactly as
   plain decoding at depth T. The round emits the accepted drafts plus the correction (a + 1
   tokens when a < k drafts are kept), or k when all are.

Rollback: the K/V of positions past the accepted ones stay in the cache but lie past the
sequence's length (masked, then overwritten); the blocks past what the sequence needs are
freed. Prefix blocks are never touched: rounds start after the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from parcae_serve.server.engine.decode_graph import decode_key
from parcae_serve.server.engine.runner import InFlight, ModelRunner
from parcae_serve.server.engine.sampling import (
    Sampled,
    SampleRow,
    describe,
    distribution,
    plain_greedy,
)
from parcae_serve.server.engine.sequence import Sequence

RowFor = Callable[[Sequence, list[int]], SampleRow]  # (sequence, output so far) -> sampling row


@dataclass
class Proposal:
    """What one round gives a sequence: `tokens` verified at depth T (emit in order, up to the
    first stop), out of `drafted` draft tokens of which `accepted` were kept."""

    seq: Sequence
    tokens: list[Sampled]
    drafted: int
    accepted: int


@dataclass
class _Draft:
    seq: Sequence
    k: int
    start: int  # position p: the last accepted token, not yet run
    output: list[int]  # the output before the round
    states: list[Tensor]  # (d_rec,) per drafted position: the state after d loops
    q: list[Tensor | None]  # the draft distribution of each draft token (None: plain greedy)

    @property
    def tokens(self) -> list[int]:
        """The drafted tokens x_{p+1} ..."""
        return self.seq.tokens[self.start + 1 :]


class Speculator:
    def __init__(self, runner: ModelRunner, row_for: RowFor) -> None:
        self.runner, self.row_for = runner, row_for

    def round(self, seqs: list[Sequence], ks: list[int]) -> list[Proposal]:
        """One draft-verify round for each sequence, `ks[i]` >= 1 drafts each (the caller has
        grown the tables to hold them). Leaves every sequence with its drafts removed from
        `tokens`, `computed` advanced past the positions the emitted tokens follow, and its
        table trimmed; the caller appends the proposed tokens."""
        drafts = [_Draft(s, k, s.computed, s.output, [], []) for s, k in zip(seqs, ks, strict=True)]
        fused: dict[tuple, list[_Draft]] = {}
        stepwise = []
        for d in drafts:
            depth = d.seq.request.loops.speculative.draft_depth
            if self.runner.spec_graphs.can_draft(depth, d.k) and self._greedy(d):
                fused.setdefault((depth, d.k, *_layout(d.seq, depth)), []).append(d)
            else:
                stepwise.append(d)
        for (depth, *_), members in fused.items():
            self._draft_fused(members, depth)
        for j in range(max((d.k for d in stepwise), default=0)):
            self._draft_step([d for d in stepwise if j < d.k], j)
        logits = self._verify(drafts)
        return [self._accept(d, logits[id(d)]) for d in drafts]

    # Draft ----------------------------------------------------------------------------------
    def _greedy(self, d: _Draft) -> bool:
        """Every draft of the round is the raw argmax (bans only lift as the output grows)."""
        return plain_greedy(self.row_for(d.seq, d.output))

    def _draft_fused(self, drafts: list[_Draft], depth: int) -> None:
        """All k greedy drafts of each sequence in one compiled call."""
        device = self.runner.device
        groups = []
        for d in drafts:
            positions = torch.arange(d.start, d.start + d.k)
            ids = torch.tensor([d.seq.tokens[d.start]], device=device)
            groups.append(InFlight(d.seq, positions, ids, depth))
        tokens, states = self.runner.draft(groups, depth)
        for d, drafted, h in zip(drafts, tokens, states, strict=True):
            d.seq.tokens.extend(drafted)
            d.states, d.q = list(h), [None] * d.k

    def _draft_step(self, drafts: list[_Draft], j: int) -> None:
        """One draft token for each sequence, through the decode graphs of the draft depth."""
        runner, device = self.runner, self.runner.device
        by_depth: dict[tuple, list[_Draft]] = {}
        for d in drafts:
            depth = d.seq.request.loops.speculative.draft_depth
            by_depth.setdefault((depth, *_layout(d.seq, depth)), []).append(d)
        for (depth, *_), members in by_depth.items():
            groups = []
            for d in members:
                pos = d.start + j
                ids = torch.tensor([d.seq.tokens[pos]], device=device)
                groups.append(InFlight(d.seq, torch.tensor([pos]), ids, depth))
            keys = [decode_key(depth, g.seq.table.slot) for g in groups]
            logits = runner.decode(groups, keys, runner.graphs(depth))[0].float().cpu()
            for d, g, row in zip(members, groups, logits, strict=True):
                d.states.append(g.h[0])
                d.seq.tokens.append(self._propose(d, row))

    def _propose(self, d: _Draft, logits: Tensor) -> int:
        row = self.row_for(d.seq, d.seq.output)
        if plain_greedy(row):
            d.q.append(None)
            return int(logits.argmax())
        q = distribution(logits, row)
        d.q.append(q)
        if row.params.greedy:
            return int(q.argmax())
        return int(torch.multinomial(q, 1, generator=row.generator))

    # Verify ---------------------------------------------------------------------------------
    def _verify(self, drafts: list[_Draft]) -> dict[int, Tensor]:
        """Depth-T logits (k, V), fp32 CPU, of each draft's positions, keyed by id(draft)."""
        device = self.runner.device
        batches: dict[tuple, list[tuple[_Draft, InFlight]]] = {}
        for d in drafts:
            seq = d.seq
            loops = seq.request.loops
            positions = torch.arange(d.start, d.start + d.k)
            ids = torch.tensor(seq.tokens[d.start : d.start + d.k], device=device)
            g = InFlight(seq, positions, ids, loops.depth, h=torch.stack(d.states))
            slots = tuple(seq.table.slot(t) for t in range(loops.depth))
            key = (loops.depth, loops.speculative.draft_depth, d.k, slots)
            batches.setdefault(key, []).append((d, g))
        out: dict[int, Tensor] = {}
        for (_, start, k, _), members in batches.items():
            logits = self.runner.verify([g for _, g in members], start).float().cpu()
            for i, (d, _) in enumerate(members):
                out[id(d)] = logits[i * k : (i + 1) * k]
        return out

    # Accept ---------------------------------------------------------------------------------
    def _accept(self, d: _Draft, target: Tensor) -> Proposal:
        seq, drafted = d.seq, d.tokens
        kept, correction = self._longest_prefix(d, target, drafted)
        tokens = drafted[:kept] + ([] if correction is None else [correction])
        del seq.tokens[d.start + 1 :]
        seq.computed = d.start + len(tokens)
        seq.in_flight = False
        self.runner.cache.truncate(seq.table, seq.computed + 1)
        k = seq.request.sampling.logprobs or 0
        return Proposal(seq, describe(target[: len(tokens)], tokens, [k] * len(tokens)),
                        d.k, kept)  # fmt: skip

    def _longest_prefix(
        self, d: _Draft, target: Tensor, drafted: list[int]
    ) -> tuple[int, int | None]:
        """(drafts kept, the token after them: depth T's at the first rejection, None when all
        are kept)."""
        if all(q is None for q in d.q):  # plain greedy: compare argmaxes, all at once
            best = target.argmax(-1).tolist()
            for i, (x, y) in enumerate(zip(drafted, best, strict=True)):
                if x != y:
                    return i, y
            return len(drafted), None
        for i, x in enumerate(drafted):
            row = self.row_for(d.seq, d.output + drafted[:i])
            p = distribution(target[i], row)
            if row.params.greedy:
                y = int(p.argmax())
                if x != y:
                    return i, y
                continue
            replacement = rejection_step(p, d.q[i], x, row.generator)
            if replacement is not None:
                return i, replacement
        return len(drafted), None


def _layout(seq: Sequence, loops: int) -> tuple[int, tuple[int, ...]]:
    """What rows batched into one draft call must share: their tables' slot count (the pool
    index tensors' first dimension) and the slots of the draft loops. Sequences of different
    depths draft at the same depth, but their tables differ."""
    return seq.table.num_slots, tuple(seq.table.slot(t) for t in range(loops))


def rejection_step(p: Tensor, q: Tensor, x: int, generator: torch.Generator) -> int | None:
    """One position of speculative rejection sampling (Leviathan et al. 2023, alg. 1): keep the
    draft x ~ q with probability min(1, p(x) / q(x)) (None), else return a replacement drawn
    from norm(max(0, p - q)); the token that results is distributed as p. p, q: (V,) fp32."""
    u = float(torch.rand(1, generator=generator))
    if u * float(q[x]) < float(p[x]):
        return None
    residual = (p - q).clamp_min(0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is exact
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))
