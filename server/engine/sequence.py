"""What the engine knows of a request: token ids in, token events out (no text, no HTTP)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from parcae_serve.server.engine.kv_cache import BlockTable, LoopSlotPolicy, SwappedKV
from parcae_serve.server.engine.sampling import SamplingParams

_ids = itertools.count()
DEFAULT_NOISE_SEED = 0  # the noise stream of requests without a seed


@dataclass(frozen=True)
class RecurrenceExit:
    """Stop a token's loops once successive loops differ by less than `threshold`."""

    criterion: str  # "kl" | "residual" | "learned" (the checkpoint's exit probe)
    threshold: float
    min_depth: int = 1


@dataclass(frozen=True)
class Speculation:
    """Self-speculative decoding: draft `tokens` tokens at `draft_depth` loops, then verify
    them at the request's depth in one pass (see server/engine/speculative.py)."""

    draft_depth: int
    tokens: int

    @classmethod
    def parse(cls, text: str) -> Speculation | None:
        """`off` or `D:K` (draft depth D, K tokens), as the --speculative flag takes it."""
        if text == "off":
            return None
        d, _, k = text.partition(":")
        if not (d.isdigit() and k.isdigit() and int(d) >= 1 and 2 <= int(k) <= 16):
            raise ValueError(f"invalid speculation {text!r}: use off or D:K (D >= 1, 2 <= K <= 16)")
        return cls(int(d), int(k))


@dataclass(frozen=True)
class LoopParams:
    depth: int
    exit: RecurrenceExit | None = None
    warm_start: bool = False
    kv_policy: LoopSlotPolicy | None = None  # None: the server's
    speculative: Speculation | None = None


@dataclass
class EngineRequest:
    prompt: list[int]
    sampling: SamplingParams
    loops: LoopParams


@dataclass
class StepOutput:
    """One event for one sequence: a sampled token, and/or the prompt's scores, and/or the end."""

    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    depth: int = 0
    prompt_scores: list[tuple[float, list[tuple[int, float]]]] | None = None
    prompt_depths: list[int] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    total_loops: int = 0  # loops run for this sequence so far (all positions)
    positions: int = 0  # positions run through the model so far
    draft_tokens: int = 0  # speculative tokens drafted so far
    accepted_tokens: int = 0  # of which the verify pass kept


class Sequence:
    def __init__(self, request: EngineRequest, emit: Callable[[StepOutput], None]) -> None:
        self.id = next(_ids)
        self.request, self.emit = request, emit
        self.tokens = list(request.prompt)
        self.num_prompt = len(request.prompt)
        seed = request.sampling.seed
        # h_0 noise is deterministic by default (one fixed stream per position), so greedy
        # decoding and prompt scoring repeat without a seed; a seed changes it. Sampling stays
        # random without a seed, as in OpenAI's API.
        self.noise_seed = DEFAULT_NOISE_SEED if seed is None else seed
        self.state_gen = torch.Generator()  # h_0 noise, re-seeded per position (see runner)
        self.noise_ahead: tuple[int, Tensor] | None = None  # h_0 of the next positions
        self.sample_gen = torch.Generator()
        if seed is None:
            self.sample_gen.seed()
        else:
            self.sample_gen.manual_seed(seed + 1)
        self.computed = 0  # positions whose K/V are final in the cache
        self.table: BlockTable | None = None
        self.swapped: SwappedKV | None = None  # K/V kept in host memory while preempted
        self.in_flight = False
        self.finished = False
        self.prompt_depths: list[int] = []
        self.cached_tokens = 0  # prompt positions whose K/V came from the prefix cache
        self.total_loops = 0
        self.positions_run = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0
        self.prompt_scores: list[tuple[float, list[tuple[int, float]]]] = []
        self.last_h: Tensor | None = None  # final state of the previous token (warm start)
        self.arrival = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.preemptions = 0

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt :]
