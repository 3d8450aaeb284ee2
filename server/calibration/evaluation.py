"""Quality of a serving configuration: teacher-forced NLL through the engine's own decode path.

Each held-out sequence is fed one token at a time, exactly as decode runs in the server (paged
cache, loop-slot policy, per-token exits), batched across sequences; the NLL of each next token
is read from the coda. This measures what a policy or an exit rule costs when serving, which a
whole-sequence forward (prefill) would not show.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from parcae_serve.model.exit_probe import ExitProbe
from parcae_serve.model.parcae import Parcae
from parcae_serve.server.engine.kv_cache import KVCache, LoopSlotPolicy, token_bytes
from parcae_serve.server.engine.runner import CODA_WAIT, InFlight, ModelRunner
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
    coda_wait: int | None = CODA_WAIT,
    kv_dtype: torch.dtype | None = None,
) -> DecodeQuality:
    """Mean NLL of tokens 1..L-1 of each sequence (truncated to the shortest), decoding them
    through the paged cache one position per sequence at a time, every sequence's tokens
    batched as the engine batches decode (see `_depth_batched`). tokens_per_s: scored tokens
    over the wall time of the decode, so exits that free loops show up as speed. `kv_dtype`:
    how the cache stores K/V (--kv-cache-dtype; default the model's dtype)."""
    length = min(len(s) for s in sequences)
    param = next(model.parameters())
    kv_dtype = kv_dtype or param.dtype
    slot_policy = LoopSlotPolicy.parse(policy)
    outer, rec = token_bytes(model.cfg, kv_dtype)
    bytes_per_token = outer + slot_policy.num_slots(depth) * rec
    budget = (
        bytes_per_token * len(sequences) * (length + 16)
    )  # every sequence whole, one block spare
    cache = KVCache(model.cfg, slot_policy, budget, depth, device=param.device, dtype=kv_dtype)
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
    nll, loops, start = torch.zeros(len(seqs), length - 1), 0, time.perf_counter()
    for finished, logits in _depth_batched(runner, seqs, depth, coda_wait):
        streams = [i for i, _ in finished]
        at = [int(g.positions[0]) for _, g in finished]
        targets = torch.tensor([seqs[i].tokens[p + 1] for i, p in zip(streams, at, strict=True)])
        logprobs = torch.log_softmax(logits, -1)
        nll[streams, at] = -logprobs.gather(1, targets.to(logits.device)[:, None])[:, 0].cpu()
        loops += sum(int(g.loops_used.sum()) for _, g in finished)
    elapsed = time.perf_counter() - start
    n = (length - 1) * len(seqs)
    return DecodeQuality(
        nll=float(nll.sum()) / n,
        mean_depth=loops / n,
        tokens=n,
        tokens_per_s=n / elapsed,
        cache_bytes_per_token=float(cache.token_bytes(depth)),
        token_nll=nll.T.flatten().tolist() if per_token else None,  # position-major
    )


def _depth_batched(
    runner: ModelRunner, seqs: list[Sequence], depth: int, coda_wait: int | None
) -> Iterator[tuple[list[tuple[int, InFlight]], Tensor]]:
    """Decode every position but the last of every sequence, teacher-forced, scheduled as the
    engine schedules decode (`ModelRunner.loop_until_coda`: continuous depth batching, done
    tokens waiting up to `coda_wait` loops to share a coda; None: until every token in flight
    is done, i.e. lockstep); a sequence's next position starts at the loop after its token's
    coda. Yields each coda batch as (sequence index, group) with its logits."""
    next_pos, starting = [0] * len(seqs), list(range(len(seqs)))
    stream: dict[int, int] = {}  # group uid -> sequence index
    flying: list[InFlight] = []
    while True:
        new = []
        for i in starting:
            g = _token(runner, seqs[i], next_pos[i], depth)
            if g is not None:
                stream[g.uid] = i
                new.append(g)
        if new:
            runner.prelude(new)
            flying += new
        if not flying:
            return
        done = runner.loop_until_coda(flying, coda_wait)
        flying = [g for g in flying if not g.done]
        starting = [stream.pop(g.uid) for g in done]
        yield list(zip(starting, done, strict=True)), runner.coda(done)
        for i in starting:
            next_pos[i] += 1


def _token(runner: ModelRunner, seq: Sequence, p: int, depth: int) -> InFlight | None:
    """Position `p` of `seq` as a one-token group (None past the sequence's last input)."""
    if p >= len(seq.tokens) - 1:
        return None
    return InFlight(
        seq, torch.tensor([p]), torch.tensor([seq.tokens[p]], device=runner.device), depth
    )
