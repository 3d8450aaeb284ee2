"""Quality of a serving configuration: teacher-forced NLL through the engine's own decode path.

Each held-out sequence is fed one token at a time, exactly as decode runs in the server (paged
cache, loop-slot policy, per-token exits), batched across sequences; the NLL of each next token
is read from the coda. This measures what a policy or an exit rule costs when serving, which a
whole-sequence forward (prefill) would not show.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from parcae_serve.model.exit_probe import ExitProbe
from parcae_serve.model.parcae import Parcae
from parcae_serve.server.engine.kv_cache import KVCache, LoopSlotPolicy, token_bytes
from parcae_serve.server.engine.runner import InFlight, ModelRunner
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, RecurrenceExit, Sequence


@dataclass
class DecodeQuality:
    nll: float  # mean next-token NLL (nats)
    mean_depth: float  # loops per token actually run
    tokens: int
    tokens_per_s: float
    cache_bytes_per_token: float
    token_nll: list[float] | None = None  # (tokens,) per position and sequence, if asked

    def summary(self) -> dict:
        """The scalar fields (what reports store)."""
        return {k: v for k, v in asdict(self).items() if k != "token_nll"}


def teacher_forced_nll(
    model: Parcae,
    sequences: list[list[int]],
    depth: int,
    policy: str = "per-loop",
    exit: RecurrenceExit | None = None,
    seed: int = 0,
    exit_probe: ExitProbe | None = None,
    per_token: bool = False,
) -> DecodeQuality:
    """Mean NLL of tokens 1..L-1 of each sequence, decoding through the cache one token a step."""
    length = min(len(s) for s in sequences)
    param = next(model.parameters())
    slot_policy = LoopSlotPolicy.parse(policy)
    outer, rec = token_bytes(model.cfg, param.dtype)
    bytes_per_token = outer + slot_policy.num_slots(depth) * rec
    budget = (
        bytes_per_token * len(sequences) * (length + 16)
    )  # every sequence whole, one block spare
    cache = KVCache(model.cfg, slot_policy, budget, depth, device=param.device, dtype=param.dtype)
    runner = ModelRunner(model, cache, exit_probe=exit_probe)
    seqs = []
    for i, tokens in enumerate(sequences):
        params = SamplingParams(max_tokens=0, seed=seed + i)
        seq = Sequence(
            EngineRequest(tokens[:length], params, LoopParams(depth, exit)), lambda _: None
        )
        seq.table = cache.new_table(depth, b"eval")
        assert cache.ensure(seq.table, length)
        seqs.append(seq)
    total_nll, loops, start, token_nll = 0.0, 0, time.perf_counter(), []
    for p in range(length - 1):
        groups = [
            InFlight(s, torch.tensor([p]), torch.tensor([s.tokens[p]], device=runner.device), depth)
            for s in seqs
        ]
        runner.prelude(groups)
        while not all(g.done for g in groups):
            runner.loop([g for g in groups if not g.done])
        logprobs = torch.log_softmax(runner.coda(groups), -1)
        targets = torch.tensor([s.tokens[p + 1] for s in seqs], device=logprobs.device)
        nll = -logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        total_nll += float(nll.sum())
        if per_token:
            token_nll += nll.tolist()
        loops += sum(int(g.loops_used.sum()) for g in groups)
    elapsed = time.perf_counter() - start
    n = (length - 1) * len(seqs)
    return DecodeQuality(
        nll=total_nll / n,
        mean_depth=loops / n,
        tokens=n,
        tokens_per_s=n / elapsed,
        cache_bytes_per_token=float(cache.token_bytes(depth)),
        token_nll=token_nll if per_token else None,
    )
