"""/v1/completions: request -> engine requests (once, here), engine outputs -> responses / SSE."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.server.api.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    RecurrenceUsage,
    Usage,
    completion_id,
)
from parcae_serve.server.api.text import ChoiceText
from parcae_serve.server.engine.engine import Engine, QueueFull
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.sequence import (
    EngineRequest,
    LoopParams,
    RecurrenceExit,
    Sequence,
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


@dataclass
class ServingLimits:
    model_name: str
    max_depth: int
    max_context: int
    default_depth: int
    vocab_size: int


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
    text: ChoiceText | None = None
    logp: Logprobs | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    loops: int = 0
    positions: int = 0
    error: str | None = None
    offset: int = 0  # length of text so far (for logprobs.text_offset)
    seq: Sequence | None = None
    outputs: AsyncIterator[StepOutput] | None = None


class CompletionService:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, limits: ServingLimits) -> None:
        self.engine, self.tokenizer, self.limits = engine, tokenizer, limits

    # Request -> engine requests ---------------------------------------------------------------
    def prepare(self, req: CompletionRequest) -> list[Choice]:
        if req.model is not None and req.model != self.limits.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", "NotFoundError",
                           "model", "model_not_found")  # fmt: skip
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
            rule = RecurrenceExit(spec.criterion, spec.threshold, spec.min_depth)
        loops = LoopParams(depth, rule, req.recurrence_warm_start, self._policy(req, depth))
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        vocab = self.limits.vocab_size
        if any(not 0 <= t < vocab for t in req.stop_token_ids or []):
            raise APIError(400, f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        choices = []
        for p_idx, (text, ids) in enumerate(self._prompts(req.prompt)):
            capacity = self.engine.capacity_tokens(depth, loops.kv_policy)
            budget = min(self.limits.max_context, capacity) - len(ids)
            if budget < 0 or len(ids) >= self.limits.max_context:
                raise APIError(400, f"This model's maximum context length is "
                               f"{self.limits.max_context} tokens; the prompt has {len(ids)}.",
                               param="prompt", code="context_length_exceeded")  # fmt: skip
            max_tokens = budget if req.max_tokens is None else min(req.max_tokens, budget)
            for i in range(req.n):
                sampling = self._sampling(req, max_tokens, i)
                choice = Choice(p_idx * req.n + i, EngineRequest(ids, sampling, loops), text, ids,
                                req.echo, stops, req.logprobs)  # fmt: skip
                choices.append(choice)
        return choices

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

    def _prompts(self, prompt) -> list[tuple[str, list[int]]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
                if not ids:  # a tokenizer without BOS and an empty string
                    raise APIError(400, "prompt must not be empty", param="prompt")
                out.append((p, ids))
                continue
            if not p:
                raise APIError(400, "a token prompt must not be empty", param="prompt")
            if min(p) < 0 or max(p) >= self.limits.vocab_size:
                raise APIError(400, f"token ids must be in [0, {self.limits.vocab_size})",
                               param="prompt")  # fmt: skip
            out.append((self.tokenizer.decode(p), list(p)))
        return out

    @staticmethod
    def _sampling(req: CompletionRequest, max_tokens: int, i: int) -> SamplingParams:
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
            seed=None if req.seed is None else req.seed + i,
        )

    # Engine outputs -> choices ------------------------------------------------------------------
    def _start(self, choice: Choice) -> str:
        """Initialise the choice; returns its echoed prompt text ('' without echo)."""
        choice.text = ChoiceText(self.tokenizer, choice.stops)
        choice.logp = Logprobs() if choice.logprobs is not None else None
        echo = choice.prompt_text if choice.echo else ""
        choice.offset = len(echo)
        return echo

    def _apply(self, choice: Choice, out: StepOutput) -> tuple[str, Logprobs | None]:
        """Fold one engine output into the choice; returns (new text, new logprob entries)."""
        delta, logp = "", None
        if choice.logp is not None:
            logp = Logprobs()
            if out.prompt_scores is not None and choice.echo:
                self._prompt_logprobs(choice, out, logp)
        if out.token is not None:
            choice.completion_tokens += 1
            stop_ids = choice.request.sampling.stop_token_ids
            if not (out.finish_reason == "stop" and out.token in stop_ids):  # vLLM drops its text
                delta = choice.text.push(out.token)
            if logp is not None:
                top = {self.tokenizer.token_text(t): lp for t, lp in out.top}
                text = self.tokenizer.token_text(out.token)
                self._add(logp, choice.offset, text, out.logprob, top, out.depth)
        if out.finish_reason is not None or choice.text.stopped:
            delta += choice.text.finish()
            choice.finish_reason = "stop" if choice.text.stopped else out.finish_reason
            if out.error:
                choice.error = out.error
        choice.offset += len(delta)
        if logp is not None:
            for key in ("text_offset", "token_logprobs", "tokens", "top_logprobs", "depths"):
                getattr(choice.logp, key).extend(getattr(logp, key))
        return delta, logp

    def _prompt_logprobs(self, choice: Choice, out: StepOutput, logp: Logprobs) -> None:
        scores, depths, ids = out.prompt_scores, out.prompt_depths or [], choice.prompt_ids
        offset = 0
        for i, token in enumerate(ids):
            lp, top, depth = None, None, None  # the first token has no prediction
            if i > 0:
                lp, alternatives = scores[i - 1] if i - 1 < len(scores) else (None, [])
                top = {self.tokenizer.token_text(t): v for t, v in alternatives}
                depth = depths[i - 1] if i - 1 < len(depths) else None
            self._add(logp, offset, self.tokenizer.token_text(token), lp, top, depth)
            offset += len(self.tokenizer.decode([token]))  # special tokens add no text

    @staticmethod
    def _add(logp: Logprobs, offset: int, text: str, lp, top, depth) -> None:
        logp.text_offset.append(offset)
        logp.tokens.append(text)
        logp.token_logprobs.append(lp)
        logp.top_logprobs.append(top)
        logp.depths.append(depth)

    def _submit(self, choices: list[Choice]) -> None:
        """Put every choice into the engine before any response starts: a full queue is a 429
        for the whole request, never a half-answered one."""
        if not self.engine.has_room(len(choices)):
            raise QueueFull
        try:
            for choice in choices:
                choice.seq, choice.outputs = self.engine.open(choice.request)
        except QueueFull:
            self._abort_unfinished(choices)
            raise

    def _abort_unfinished(self, choices: list[Choice]) -> None:
        for choice in choices:
            if choice.seq is not None and not choice.seq.finished:
                self.engine.abort(choice.seq)

    async def _run(self, choice: Choice) -> AsyncIterator[tuple[str, Logprobs | None]]:
        """Drive one choice through the engine; ends it early once a stop string is seen."""
        async with aclosing(choice.outputs) as outputs:
            async for out in outputs:
                choice.loops, choice.positions = out.total_loops, out.positions
                yield self._apply(choice, out)
                if choice.finish_reason is not None:
                    if out.finish_reason is None:  # a stop string, seen here at the edge
                        self.engine.abort(choice.seq, "stop")
                    break

    @staticmethod
    def _usage(choices: list[Choice], n: int) -> Usage:
        prompt = sum(len(c.prompt_ids) for c in choices if c.index % n == 0)
        completion = sum(c.completion_tokens for c in choices)
        loops, positions = sum(c.loops for c in choices), sum(c.positions for c in choices)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            recurrence=RecurrenceUsage(
                mean_depth=round(loops / positions, 4) if positions else 0.0, total_loops=loops
            ),
        )

    # Non-streaming --------------------------------------------------------------------------------
    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        choices = self.prepare(req)
        self._submit(choices)

        async def one(choice: Choice) -> None:
            self._start(choice)
            async for _ in self._run(choice):
                pass

        try:
            await asyncio.gather(*(one(c) for c in choices))
        finally:
            self._abort_unfinished(choices)  # cancelled (client gone) before reading everything
        self._raise_engine_error(choices)
        return CompletionResponse(
            model=self.limits.model_name,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=(c.prompt_text if c.echo else "") + c.text.text,
                    logprobs=c.logp,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=self._usage(choices, req.n),
        )

    @staticmethod
    def _raise_engine_error(choices: list[Choice]) -> None:
        for c in choices:
            if c.error:
                raise APIError(500, c.error, "internal_error")

    # Streaming ----------------------------------------------------------------------------------
    async def stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        """Server-sent events exactly as OpenAI / vLLM send them. Validation happens before the
        first byte, so errors still get a proper status code."""
        choices = self.prepare(req)
        self._submit(choices)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._events(choices, include_usage, req.n)

    async def _events(
        self, choices: list[Choice], include_usage: bool, n: int
    ) -> AsyncIterator[str]:
        cid, created = completion_id(), int(time.time())
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                echo = self._start(choice)
                if echo and choice.logprobs is None:
                    await queue.put((choice, echo, None))
                async for delta, logp in self._run(choice):
                    if delta or logp is not None or choice.finish_reason:
                        text = echo + delta if echo else delta
                        echo = ""
                        await queue.put((choice, text, logp))
            finally:
                await queue.put((choice, None, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            live = len(choices)
            while live:
                choice, text, logp = await queue.get()
                if text is None:
                    live -= 1
                    continue
                if choice.error:
                    yield _sse({"error": {"message": choice.error, "type": "internal_error",
                                          "param": None, "code": None}})  # fmt: skip
                    continue
                body = {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.limits.model_name,
                    "choices": [
                        {
                            "index": choice.index,
                            "text": text,
                            "logprobs": logp.model_dump() if logp is not None else None,
                            "finish_reason": choice.finish_reason,
                        }
                    ],
                }
                yield _sse(body)
            if include_usage:
                body = {"id": cid, "object": "text_completion", "created": created,
                        "model": self.limits.model_name, "choices": [],
                        "usage": self._usage(choices, n).model_dump()}  # fmt: skip
                yield _sse(body)
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._abort_unfinished(choices)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
