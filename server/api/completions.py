"""/v1/completions: request -> engine requests (once, here), engine outputs -> responses / SSE."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import NamedTuple

from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.server.api.frontier import Frontier
from parcae_serve.server.api.protocol import (
    REFUSED_FIELDS,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    PromptTokensDetails,
    RecurrenceExitSpec,
    RecurrenceUsage,
    SpeculativeUsage,
    Usage,
)
from parcae_serve.server.api.served_models import ServedModels, UnknownModel
from parcae_serve.server.api.text import (
    ChoiceText,
    encode_with_offsets,
    token_names,
    token_offsets,
    with_bos,
)
from parcae_serve.server.engine.engine import Engine, QueueFull
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy
from parcae_serve.server.engine.sampling import (
    SamplingParams,
    banned_before_min_tokens,
    is_greedy,
)
from parcae_serve.server.engine.sequence import (
    EngineRequest,
    LoopParams,
    RecurrenceExit,
    Sequence,
    Speculation,
    StepOutput,
)


class APIError(Exception):
    """An error the client caused or must handle; rendered as the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


log = logging.getLogger("parcae.serve")
MAX_STOPS = 64  # stop strings per request (OpenAI allows 4; each costs work on every token)
MIN_LOGPROB = -9999.0  # what JSON can carry for -inf, as vLLM reports it
LOGPROB_FIELDS = ("text_offset", "token_logprobs", "tokens", "top_logprobs", "depths")


@dataclass
class ServingLimits:
    models: ServedModels
    max_depth: int
    max_context: int
    vocab_size: int
    max_sequences: int  # --max-batch + --max-queue: the most sequences the server ever holds
    max_prompt_chars: int  # a longer text prompt cannot fit the context (see longest_token_chars)
    frontier: Frontier | None = None  # measured by calibration: what criterion "auto" picks from
    speculative: Speculation | None = None  # the server's default (--speculative)

    @property
    def model_name(self) -> str:
        return self.models.primary

    @property
    def default_depth(self) -> int:
        return self.models.default_depth


@dataclass
class Piece:
    """What one engine output adds to a choice; a response is the concatenation of its pieces,
    whether they are sent one by one (SSE) or all at once."""

    text: str
    logprobs: Logprobs | None
    finish_reason: str | None


class TokenizedPrompt(NamedTuple):
    text: str  # what `echo` returns: the text sent, or the decoded token ids
    ids: list[int]
    added_bos: bool  # the server put BOS first (not echoed)
    offsets: list[int] | None  # where each id starts in `text` (None: found by decoding)


@dataclass
class Choice:
    """One sequence to generate, and what its response needs."""

    index: int
    request: EngineRequest
    prompt_text: str
    prompt_ids: list[int]
    echo: bool
    stops: list[str]
    logprobs: int | None
    as_ids: bool  # logprob tokens named `token_id:<id>`
    added_bos: bool  # the server put BOS before the client's prompt (not echoed)
    prompt_offsets: list[int] | None = None  # where each prompt id starts in prompt_text
    text: ChoiceText | None = None
    started: bool = False
    held: list[tuple] = field(default_factory=list)  # logprob entries waiting for their text
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    loops: int = 0
    positions: int = 0
    drafted: int = 0  # speculative tokens drafted / accepted
    accepted: int = 0
    error: str | None = None
    seq: Sequence | None = None
    outputs: AsyncIterator[StepOutput] | None = None

    @property
    def text_start(self) -> int:
        """Where the generated text starts in the returned text."""
        return len(self.prompt_text) if self.echo else 0


# A token id as a JSON key: ASCII digits (str.isdigit also takes "²", which int() refuses, and
# int() takes "１" and "٣", which no client means as an id).
TOKEN_ID = re.compile(r"\s*-?[0-9]+\s*")


def logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias: keys are token ids (as JSON strings), values in [-100, 100]."""
    out = {}
    for key, value in (bias or {}).items():
        if not TOKEN_ID.fullmatch(key) or not 0 <= int(key) < vocab:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}",
                           param="logit_bias")  # fmt: skip
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value}",
                           param="logit_bias")  # fmt: skip
        out[int(key)] = float(value)
    return out


class CompletionService:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: ServingLimits) -> None:
        self.engine, self.tokenizer, self.limits = engine, tokenizer, limits
        self.live: set[Sequence] = set()  # submitted and not yet finished (the drain ends them)
        self.closed = False  # set by abort_all: nothing more is submitted
        self._ignored_logged: set[str] = set()

    # Request -> engine requests ---------------------------------------------------------------
    async def prepare(self, req: CompletionRequest) -> list[Choice]:
        """Every check that needs no tokens comes first; tokenising runs off the event loop."""
        self._check_fields(req)
        given = set(req.model_fields_set)  # what the client set, before its model name applies
        self._apply_model_name(req)
        if req.recurrence_exit is not None and req.recurrence_speculative:
            raise APIError(400, "speculative decoding verifies at a fixed depth: it does not "
                           "combine with recurrence_exit", param="recurrence_speculative")  # fmt: skip
        if req.recurrence_exit is not None and req.recurrence_exit.criterion == "auto":
            self._choose_from_frontier(req, "recurrence_depth" in given)
        depth = req.recurrence_depth or self.limits.default_depth
        if depth > self.limits.max_depth:
            raise APIError(400, f"recurrence_depth must be between 1 and {self.limits.max_depth}, "
                           f"got {depth}", param="recurrence_depth")  # fmt: skip
        rule = None
        if req.recurrence_exit is not None:
            spec = req.recurrence_exit
            if spec.min_depth > depth:
                message = f"recurrence_exit.min_depth ({spec.min_depth}) exceeds depth {depth}"
                raise APIError(400, message, param="recurrence_exit.min_depth")
            if spec.criterion == "learned" and self.engine.runner.exit_probe is None:
                raise APIError(400, "this model has no learned exit probe (write one with "
                               "`parcae calibrate`)", param="recurrence_exit.criterion")  # fmt: skip
            rule = RecurrenceExit(spec.criterion, spec.threshold, spec.min_depth)
        policy = self._policy(req, depth)
        speculation = self._speculation(req, depth, rule, policy)
        loops = LoopParams(depth, rule, req.recurrence_warm_start, policy, speculation)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
        vocab = self.limits.vocab_size
        if any(not 0 <= t < vocab for t in req.stop_token_ids or []):
            raise APIError(400, f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if req.min_tokens and self._bans_every_token(req, vocab):
            raise APIError(400, "stop_token_ids (with EOS, unless ignore_eos) cover the whole "
                           "vocabulary: until min_tokens no token could be sampled",
                           param="min_tokens")  # fmt: skip
        bias = logit_bias(req.logit_bias, vocab)
        prompts = self._prompt_list(req.prompt, req.n)
        seed = random.randrange(2**62) if req.seed == -1 else req.seed
        choices = []
        tokenized = await self._tokenize(prompts, req.add_special_tokens)
        for p_idx, (text, ids, added_bos, offsets) in enumerate(tokenized):
            max_tokens = self._room(ids, req.max_tokens, depth, loops)
            for i in range(req.n):
                sampling = self._sampling(req, max_tokens, None if seed is None else seed + i)
                sampling.logit_bias = bias
                choice = Choice(p_idx * req.n + i, EngineRequest(ids, sampling, loops), text, ids,
                                req.echo, stops, req.logprobs, req.return_tokens_as_token_ids,
                                added_bos, offsets)  # fmt: skip
                choices.append(choice)
        return choices

    def _bans_every_token(self, req: CompletionRequest, vocab: int) -> bool:
        """Whether no token may be sampled before min_tokens."""
        stop_ids, eos = req.stop_token_ids or [], self.tokenizer.eos_id
        return len(set(banned_before_min_tokens(stop_ids, eos, req.ignore_eos))) >= vocab

    def _room(self, ids: list[int], max_tokens: int | None, depth: int, loops: LoopParams) -> int:
        """The request's max_tokens clipped to the room its prompt leaves (unset: all of it) in
        the model's context or, at this depth and KV policy, the cache: 400 naming the limit that
        binds when the prompt does not fit, or fills it and a completion is asked for (a full
        window may still be scored: max_tokens 0)."""
        capacity = self.engine.capacity_tokens(depth, loops.kv_policy)
        room = min(self.limits.max_context, capacity) - len(ids)
        if room > 0 or (room == 0 and max_tokens == 0):
            return room if max_tokens is None else min(max_tokens, room)
        what = f"the prompt has {len(ids)} tokens"
        if room == 0:
            what += ", which leaves no room for a completion"
        limit = None
        if capacity < self.limits.max_context:
            policy = loops.kv_policy or self.engine.cache.policy
            slots = f"{policy.num_slots(depth)} loop slots" + (
                f", every loop kept above depth {policy.upto}"
                if policy.kind != "per-loop" and policy.exact_at(depth)
                else ""
            )
            limit = (f"The KV cache holds at most {capacity} tokens of one sequence at recurrence "
                     f"depth {depth} (--kv-cache-bytes, KV policy {policy}: {slots})")  # fmt: skip
        raise _context_exceeded(self.limits.max_context, what, limit)

    def _choose_from_frontier(self, req: CompletionRequest, depth_given: bool) -> None:
        """`auto`: replace the request's depth and exit with the fastest measured setting within
        its NLL budget (a depth the model name stood for is replaced too)."""
        frontier = self.limits.frontier
        if frontier is None:
            raise APIError(400, "criterion auto needs the model's measured frontier (run `parcae "
                           "calibrate`)", param="recurrence_exit.criterion")  # fmt: skip
        if depth_given:
            raise APIError(400, "criterion auto chooses the depth: drop recurrence_depth",
                           param="recurrence_depth")  # fmt: skip
        point = frontier.cheapest(req.recurrence_exit.max_nll_cost, self.limits.max_depth)
        if point is None:
            raise APIError(400, f"no measured setting is within --max-depth "
                           f"{self.limits.max_depth}", param="recurrence_exit")  # fmt: skip
        req.recurrence_depth = point.depth
        req.recurrence_exit = None if point.criterion is None else RecurrenceExitSpec(
            criterion=point.criterion, threshold=point.threshold, min_depth=1)  # fmt: skip

    def _apply_model_name(self, req: CompletionRequest) -> None:
        """Fill the looping fields the request's model name stands for (`ID@T12`, a preset)
        where the request did not set them itself."""
        try:
            looping = self.limits.models.resolve(req.model)
        except UnknownModel:
            raise model_not_found(req.model) from None
        for name, value in looping:
            if value is not None and name not in req.model_fields_set:
                setattr(req, name, value)

    def _check_fields(self, req: CompletionRequest) -> None:
        """Refuse what would otherwise be silently ignored or contradictory."""
        for name, value in (req.model_extra or {}).items():
            if name in REFUSED_FIELDS:
                if value not in REFUSED_FIELDS[name]:
                    raise APIError(400, f"{name} is not supported by this server", param=name,
                                   code="unsupported_parameter")  # fmt: skip
            elif name not in self._ignored_logged and len(self._ignored_logged) < 256:
                self._ignored_logged.add(name)
                log.warning("ignoring unknown completions field %r (logged once)", name)
        if req.max_tokens is not None and req.min_tokens > req.max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens "
                           f"({req.max_tokens})", param="min_tokens")  # fmt: skip
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true",
                           param="stream_options")  # fmt: skip
        if req.stream_options is not None and req.stream_options.continuous_usage_stats:
            raise APIError(400, "stream_options.continuous_usage_stats is not supported by this "
                           "server", param="stream_options.continuous_usage_stats",
                           code="unsupported_parameter")  # fmt: skip

    def _speculation(
        self,
        req: CompletionRequest,
        depth: int,
        rule: RecurrenceExit | None,
        policy: LoopSlotPolicy | None,
    ) -> Speculation | None:
        """The request's speculation, checked; absent, the server's where it applies: greedy
        (a sampled draft costs a decode call per token: measured 0.83x), an exact KV layout
        (under a lossy one the verify chunk changes the output), a fixed depth deeper than the
        draft, no warm start."""
        spec = req.recurrence_speculative
        if spec is False:
            return None
        if spec is None:
            default = self.limits.speculative
            fits = (
                default is not None and default.draft_depth < depth and is_greedy(req.temperature)
            )
            exact = (policy or self.engine.cache.policy).exact_at(depth)  # else output changes
            return (
                default
                if fits and exact and rule is None and not req.recurrence_warm_start
                else None
            )
        param = "recurrence_speculative"
        if spec.draft_depth >= depth:
            raise APIError(400, f"recurrence_speculative.draft_depth ({spec.draft_depth}) must "
                           f"be below the recurrence depth ({depth})",
                           param=f"{param}.draft_depth")  # fmt: skip
        if req.recurrence_warm_start:
            raise APIError(400, "speculative decoding does not combine with "
                           "recurrence_warm_start", param=param)  # fmt: skip
        return Speculation(spec.draft_depth, spec.tokens)

    def _policy(self, req: CompletionRequest, depth: int) -> LoopSlotPolicy | None:
        if req.kv_policy is None:
            return None
        try:
            policy = LoopSlotPolicy.parse(req.kv_policy)
        except ValueError as err:
            raise APIError(400, str(err), param="kv_policy") from None
        if not self.engine.cache.allows(policy, depth):
            server = self.engine.cache.policy
            message = f"kv_policy {policy} needs more cache slots than the server's {server}"
            raise APIError(400, message, param="kv_policy")
        return policy

    def _prompt_list(self, prompt, n: int) -> list[str | list[int]]:
        """The prompts, checked for what is visible without tokenising, count first."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(prompt) * n > self.limits.max_sequences:
            raise APIError(400, f"this request needs {len(prompt) * n} sequences (prompts x "
                           f"n); the server holds at most {self.limits.max_sequences} at once "
                           "(--max-batch + --max-queue)",
                           param="n" if n > 1 else "prompt")  # fmt: skip
        for p in prompt:
            if isinstance(p, str):
                if len(p) > self.limits.max_prompt_chars:
                    raise _context_exceeded(self.limits.max_context,
                                            f"the prompt has {len(p)} characters")  # fmt: skip
                continue
            if not p:
                raise APIError(400, "a token prompt must not be empty", param="prompt")
            if len(p) > self.limits.max_context:  # too long even with no BOS and no completion
                raise _context_exceeded(self.limits.max_context, f"the prompt has {len(p)} tokens")
            if min(p) < 0 or max(p) >= self.limits.vocab_size:
                raise APIError(400, f"token ids must be in [0, {self.limits.vocab_size})",
                               param="prompt")  # fmt: skip
        return prompt

    async def _tokenize(
        self, prompts: list[str | list[int]], add_bos: bool
    ) -> list[TokenizedPrompt]:
        """Each prompt tokenised in a worker thread: a long prompt must not stall other
        requests, streams or /health. A text prompt's offsets are the tokenizer's, into the
        text as sent (what `echo` returns); token ids are echoed as their decoded text, whose
        offsets come from decoding.

        With `add_special_tokens` (the default) every prompt, text or token ids, starts with
        BOS: the server adds it unless the ids already start with it. So a text and its token
        ids (lm-eval's two request modes: its tokens never carry BOS) are the same sequence to
        the model and score the same; the added BOS is never echoed (`echo` returns what the
        client sent, each token scored)."""

        def work() -> list[TokenizedPrompt]:
            texts = [p for p in prompts if isinstance(p, str)]
            encoded = iter(encode_with_offsets(self.tokenizer, texts) if texts else [])
            out = []
            for p in prompts:
                text, (raw, offsets) = (
                    (p, next(encoded))
                    if isinstance(p, str)
                    else (self.tokenizer.decode(p), (p, None))
                )
                ids, added = with_bos(self.tokenizer, raw) if add_bos else (list(raw), False)
                if offsets is not None and added:
                    offsets = [0, *offsets]
                out.append(TokenizedPrompt(text, ids, added, offsets))
            return out

        out = await asyncio.to_thread(work)
        if any(not p.ids for p in out):  # a tokenizer without BOS and an empty string
            raise APIError(400, "prompt must not be empty", param="prompt")
        return out

    @staticmethod
    def _sampling(req: CompletionRequest, max_tokens: int, seed: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            min_tokens=min(req.min_tokens, max_tokens),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
            seed=seed,
        )

    # Engine outputs -> pieces -------------------------------------------------------------------
    def _apply(self, choice: Choice, out: StepOutput) -> Piece:
        """Fold one engine output into the choice. Logprob entries travel with their text: an
        entry is released once the text before its token is, so every text_offset points into
        the text the client ends up with, streamed or not."""
        logp = Logprobs() if choice.logprobs is not None else None
        text = ""
        if not choice.started:
            choice.started = True
            choice.text = ChoiceText(self.tokenizer, choice.stops,
                                     choice.request.sampling.min_tokens)  # fmt: skip
            if choice.echo:
                text = choice.prompt_text
                if logp is not None and out.prompt_scores is not None:
                    self._prompt_logprobs(choice, out, logp)
        if out.token is not None:
            choice.completion_tokens += 1
            stop_ids = choice.request.sampling.stop_token_ids
            if out.finish_reason == "stop" and out.token in stop_ids:  # vLLM drops its text
                offset = choice.text_start + choice.text.decoded
            else:
                text += choice.text.push(out.token)
                offset = choice.text_start + choice.text.token_start
            if logp is not None:
                entry = self._entry(choice, out.token, out.logprob, out.top, out.depth)
                choice.held.append((offset, *entry))
        if out.finish_reason is not None or choice.text.stopped:
            text += choice.text.finish()
            choice.finish_reason = "stop" if choice.text.stopped else out.finish_reason
            if out.error:
                choice.error = out.error
        if logp is not None:
            end = choice.text_start + len(choice.text.text)
            while choice.held and (choice.finish_reason or choice.held[0][0] <= end):
                offset, *entry = choice.held.pop(0)
                _add(logp, min(offset, end), *entry)
        return Piece(text, logp, choice.finish_reason)

    def _prompt_logprobs(self, choice: Choice, out: StepOutput, logp: Logprobs) -> None:
        scores, depths, ids = out.prompt_scores, out.prompt_depths or [], choice.prompt_ids
        offsets = choice.prompt_offsets or token_offsets(self.tokenizer, ids)
        for i, token in enumerate(ids):
            if i == 0 and choice.added_bos:  # the server's, not the client's: not echoed
                continue
            offset = min(offsets[i], len(choice.prompt_text))
            if i == 0:  # the first token has no prediction
                _add(logp, offset, token_names(self.tokenizer, [token], choice.as_ids)[token],
                     None, None, None)  # fmt: skip
                continue
            lp, alternatives = scores[i - 1] if i - 1 < len(scores) else (None, [])
            depth = depths[i - 1] if i - 1 < len(depths) else None
            _add(logp, offset, *self._entry(choice, token, lp, alternatives, depth))

    def _entry(
        self, choice: Choice, token: int, lp: float | None, top: list[tuple[int, float]], depth
    ) -> tuple:
        """(name, logprob, top_logprobs, depth) of one position; the token itself is always in
        its top_logprobs (also for logprobs: 0), under the same unique name."""
        names = token_names(self.tokenizer, [token, *(t for t, _ in top)], choice.as_ids)
        alternatives = {names[t]: _finite(v) for t, v in top}
        if lp is not None:
            alternatives.setdefault(names[token], _finite(lp))
        return names[token], None if lp is None else _finite(lp), alternatives, depth

    def _submit(self, choices: list[Choice]) -> None:
        """Put every choice into the engine before any response starts: a full queue is a 429
        for the whole request, never a half-answered one."""
        if self.closed:  # admitted before the drain began, tokenised after its grace ran out
            raise APIError(503, "server is shutting down", "service_unavailable",
                           headers={"Retry-After": "5"})  # fmt: skip
        if not self.engine.has_room(len(choices)):
            raise QueueFull
        try:
            for choice in choices:
                choice.seq, choice.outputs = self.engine.open(choice.request)
                self.live.add(choice.seq)
        except QueueFull:
            self._abort_unfinished(choices)
            raise

    def abort_all(self, reason: str = "abort") -> int:
        """End every running request at the next engine step (their responses still end
        properly, with this finish_reason) and take no more; returns how many were running."""
        self.closed = True
        for seq in list(self.live):
            self.engine.abort(seq, reason)
        return len(self.live)

    def _abort_unfinished(self, choices: list[Choice]) -> None:
        for choice in choices:
            if choice.seq is not None:
                self.live.discard(choice.seq)
                if not choice.seq.finished:
                    self.engine.abort(choice.seq)

    async def _run(self, choice: Choice) -> AsyncIterator[Piece]:
        """Drive one choice through the engine; ends it early once a stop string is seen."""
        async with aclosing(choice.outputs) as outputs:
            async for out in outputs:
                choice.loops, choice.positions = out.total_loops, out.positions
                choice.drafted, choice.accepted = out.draft_tokens, out.accepted_tokens
                choice.cached_tokens = choice.seq.cached_tokens
                yield self._apply(choice, out)
                if choice.finish_reason is not None:
                    if out.finish_reason is None:  # a stop string, seen here at the edge
                        self.engine.abort(choice.seq, "stop")
                    break
        self.live.discard(choice.seq)

    @staticmethod
    def usage(choices: list[Choice], n: int) -> Usage:
        """Prompt tokens count once per prompt (of its `n` choices, the most served from the
        prefix cache count as cached); loops and completion tokens count for every choice."""
        firsts = [c for c in choices if c.index % n == 0]
        prompt = sum(len(c.prompt_ids) for c in firsts)
        cached = sum(
            max(c.cached_tokens for c in choices[i : i + n]) for i in range(0, len(choices), n)
        )
        completion = sum(c.completion_tokens for c in choices)
        loops, positions = sum(c.loops for c in choices), sum(c.positions for c in choices)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            recurrence=RecurrenceUsage(
                mean_depth=round(loops / positions, 4) if positions else 0.0,
                total_loops=loops,
                speculative=_speculative_usage(choices),
            ),
        )

    async def start(self, req: CompletionRequest) -> list[Choice]:
        """Prepare and submit: every check before any response starts."""
        choices = await self.prepare(req)
        self._submit(choices)
        return choices

    async def run(self, req: CompletionRequest, record: dict | None) -> tuple[list[Result], Usage]:
        """A whole non-streamed request: started, run to its end, its usage noted in `record`."""
        choices = await self.start(req)
        results = await self.gather(choices)
        usage = self.usage(choices, req.n)
        note_usage(record, usage)
        return results, usage

    # Non-streaming: the concatenation of the pieces ------------------------------------------------
    async def gather(self, choices: list[Choice]) -> list[Result]:
        """Every choice run to its end (cancelled with the caller, freeing its sequences); an
        engine error is a 500."""
        results: dict[int, Result] = {}

        async def one(choice: Choice) -> None:
            text, logp = [], Logprobs() if choice.logprobs is not None else None
            async for piece in self._run(choice):
                text.append(piece.text)
                if logp is not None:
                    _extend(logp, piece.logprobs)
            results[choice.index] = Result(choice, "".join(text), logp)

        try:
            await asyncio.gather(*(one(c) for c in choices))
        finally:
            self._abort_unfinished(choices)  # cancelled (client gone) before reading everything
        for c in choices:
            if c.error:
                raise APIError(500, c.error, "internal_error")
        return [results[c.index] for c in choices]

    async def complete(
        self, req: CompletionRequest, record: dict | None = None
    ) -> CompletionResponse:
        results, usage = await self.run(req, record)
        return CompletionResponse(
            id=self.response_id(record, "cmpl"),
            model=req.model or self.limits.model_name,
            choices=[CompletionChoice(index=r.choice.index, text=r.text, logprobs=r.logprobs,
                                      finish_reason=r.choice.finish_reason) for r in results],
            usage=usage,
        )  # fmt: skip

    @staticmethod
    def response_id(record: dict | None, prefix: str) -> str:
        """`<prefix>-<X-Request-Id>` when the client sent one (vLLM's), else a fresh id."""
        given = (record or {}).get("request_id")
        return f"{prefix}-{given}" if given else f"{prefix}-{uuid.uuid4().hex}"

    # Streaming: one event per piece -----------------------------------------------------------------
    async def stream(
        self, req: CompletionRequest, record: dict | None = None
    ) -> AsyncIterator[str]:
        """Server-sent events exactly as OpenAI / vLLM send them. Validation happens before the
        first byte, so errors still get a proper status code."""
        choices = await self.start(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        usage_slot = {"usage": None} if include_usage else {}  # OpenAI: null until the last event
        frame = {"id": self.response_id(record, "cmpl"), "object": "text_completion",
                 "created": int(time.time()), "model": req.model or self.limits.model_name}  # fmt: skip

        def chunk(choice: Choice, piece: Piece) -> list[dict]:
            logprobs = piece.logprobs.model_dump() if piece.logprobs else None
            return [{**frame, **usage_slot, "choices": [{"index": choice.index, "text": piece.text,
                                           "logprobs": logprobs,
                                           "finish_reason": piece.finish_reason}]}]  # fmt: skip

        return self.events(choices, req.n, chunk, frame if include_usage else None, record)

    async def events(
        self,
        choices: list[Choice],
        n: int,
        render: Callable[[Choice, Piece], list[dict]],
        usage_frame: dict | None,
        record: dict | None,
    ) -> AsyncIterator[str]:
        """The SSE stream of started `choices`: `render` turns each piece into event bodies; a
        last event carries the usage (with `usage_frame`'s fields) when asked; `[DONE]` ends it."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for piece in self._run(choice):
                    if (
                        piece.text
                        or piece.finish_reason
                        or (piece.logprobs and piece.logprobs.tokens)
                    ):
                        await queue.put((choice, piece))
            finally:
                await queue.put((choice, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            live = len(choices)
            while live:
                choice, piece = await queue.get()
                if piece is None:
                    live -= 1
                    continue
                if choice.error:
                    yield _sse({"error": {"message": choice.error, "type": "internal_error",
                                          "param": None, "code": None}})  # fmt: skip
                    continue
                for body in render(choice, piece):
                    yield _sse(body)
            usage = self.usage(choices, n)
            note_usage(record, usage)
            if usage_frame is not None:
                yield _sse({**usage_frame, "choices": [], "usage": usage.model_dump()})
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._abort_unfinished(choices)


@dataclass
class Result:
    """A choice run to its end, for a non-streamed response."""

    choice: Choice
    text: str
    logprobs: Logprobs | None


def _speculative_usage(choices: list[Choice]) -> SpeculativeUsage | None:
    if not any(c.request.loops.speculative for c in choices):
        return None
    drafted, accepted = sum(c.drafted for c in choices), sum(c.accepted for c in choices)
    rate = round(accepted / drafted, 4) if drafted else 0.0
    return SpeculativeUsage(draft_tokens=drafted, accepted_tokens=accepted, acceptance_rate=rate)


def note_usage(record: dict | None, usage: Usage) -> None:
    """Tell the request's access-log line what the request cost."""
    if record is not None:
        record.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                      cached_tokens=usage.prompt_tokens_details.cached_tokens,
                      mean_depth=usage.recurrence.mean_depth)  # fmt: skip


def model_not_found(name: str | None) -> APIError:
    """404 model_not_found (OpenAI's body); a long name is cut to its first 200 characters."""
    shown = name if name is None or len(name) <= 200 else name[:200] + "..."
    return APIError(404, f"The model `{shown}` does not exist.", "NotFoundError", "model",
                    "model_not_found")  # fmt: skip


def _context_exceeded(max_context: int, what: str, limit: str | None = None) -> APIError:
    """400 context_length_exceeded: `limit` names the limit that binds (default: the model's
    context), `what` the request's part."""
    limit = limit or f"This model's maximum context length is {max_context} tokens"
    return APIError(400, f"{limit}; {what}.", param="prompt", code="context_length_exceeded")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def _add(logp: Logprobs, offset: int, text: str, lp, top, depth) -> None:
    logp.text_offset.append(offset)
    logp.tokens.append(text)
    logp.token_logprobs.append(lp)
    logp.top_logprobs.append(top)
    logp.depths.append(depth)


def _extend(dst: Logprobs, src: Logprobs) -> None:
    for key in LOGPROB_FIELDS:
        getattr(dst, key).extend(getattr(src, key))


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
