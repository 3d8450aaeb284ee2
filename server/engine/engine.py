"""The engine: one thread owns the model and runs continuous depth batching.

Each step: admit waiting sequences, start prefill chunks and decode tokens (prelude), run
recurrent loops for every in-flight group until at least one group is done, finish those
(coda, sampling) and hand their outputs to per-request queues. HTTP handlers only submit and
read; `generate_sync` gives tests and benchmarks the same engine without HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from parcae_serve.model.exit_probe import ExitProbe
from parcae_serve.model.parcae import Parcae
from parcae_serve.server.engine.decode_graph import configure_compiler
from parcae_serve.server.engine.kv_cache import KVCache, LoopSlotPolicy
from parcae_serve.server.engine.metrics import Metrics
from parcae_serve.server.engine.relay import LoopSink, OutputRelay, deliver
from parcae_serve.server.engine.runner import CODA_WAIT, InFlight, ModelRunner
from parcae_serve.server.engine.sampling import (
    Sampled,
    SampleRow,
    banned_before_min_tokens,
    plain_greedy,
    prompt_scores,
    sample,
)
from parcae_serve.server.engine.scheduler import QueueFull, Scheduler, SchedulerConfig, Work
from parcae_serve.server.engine.sequence import EngineRequest, Sequence, Speculation, StepOutput
from parcae_serve.server.engine.speculative import Speculator

__all__ = ["Engine", "EngineConfig", "QueueFull"]


@dataclass
class EngineConfig:
    scheduler: SchedulerConfig
    kv_policy: str | LoopSlotPolicy = "per-loop"  # a resolved policy (see choose_policy)
    kv_cache_bytes: int = 256 * 2**20
    block_size: int = 16
    eos_id: int | None = None
    compile: str = "off"  # compiled decode path: "off" | "eager" | "inductor" | "cudagraphs"
    typical_depth: int | None = None  # the depth most requests run (default: mean_recurrence):
    # how the pool is split between outer and recurrent blocks
    threads: int | None = None  # CPU kernel threads of the engine thread (None: torch's default)
    kv_cache_dtype: torch.dtype | None = None  # how the pools store K/V (None: the model's dtype)
    coda_wait: int = CODA_WAIT  # loops a done token may wait to share its coda (coda_ready)


class Engine:
    def __init__(
        self,
        model: Parcae,
        config: EngineConfig,
        metrics: Metrics | None = None,
        exit_probe: ExitProbe | None = None,
    ) -> None:
        """`exit_probe`: the checkpoint's learned exit (criterion "learned"), if it has one."""
        self.model, self.config = model, config
        self.metrics = metrics or Metrics()
        dtype = config.kv_cache_dtype or next(model.parameters()).dtype
        device = next(model.parameters()).device
        policy = config.kv_policy
        if isinstance(policy, str):
            policy = LoopSlotPolicy.parse(policy)
        self.cache = KVCache(
            model.cfg,
            policy,
            config.kv_cache_bytes,
            typical_depth=config.typical_depth or model.cfg.mean_recurrence,
            block_size=config.block_size,
            device=device,
            dtype=dtype,
        )
        self.scheduler = Scheduler(config.scheduler, self.cache)
        self.runner = ModelRunner(model, self.cache, config.compile, exit_probe)
        self.speculator = Speculator(self.runner, self._row)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.pool: list[InFlight] = []
        self._thread: threading.Thread | None = None
        self._relay: OutputRelay | None = None
        self._outbox: list[tuple[Callable[[StepOutput], None], StepOutput]] = []
        self._stop = False
        self.pending = 0  # submitted and not yet finished (read by the SIGTERM drain)
        self._pending_lock = threading.Lock()
        self._counted = (0, 0, 0)  # prefix queries, hits, preemptions already in the metrics
        self._spec_totals = [0, 0]  # tokens drafted, accepted (for the acceptance-rate gauge)

    # Lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine in a thread of its own. In-process callers: keep no other thread with
        a multi-threaded torch (OpenMP) pool alive meanwhile (load and compile in a thread that
        ends, or at one thread): with more OpenMP threads than cores, libgomp stops spinning
        and the engine steps ~5x slower (bench/RESULTS.md, "Decode attention")."""
        self._relay = OutputRelay()
        self._thread = threading.Thread(target=self._run, name="parcae-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._relay is not None:
            self._relay.stop()
            self._relay = None  # stepped by hand from now on: outputs go out as they are sent

    def compile_decode(self, depths: list[int], speculation: Speculation | None = None) -> None:
        """Compile (warm up) the decode and prefill graphs of `depths` (one serves every KV
        policy), and with `speculation` its draft depth and the verify graphs of each depth;
        call before serving. Other depths run eagerly."""
        if self.runner.decoder is None:
            return
        configure_compiler()
        drafts = [speculation.draft_depth] if speculation else []
        for depth in dict.fromkeys(depths + drafts):
            self.runner.decoder.warm(depth)
        for depth in depths:
            self.runner.spec_graphs.warm_prefill(depth)
        for depth in depths:
            if speculation and speculation.draft_depth < depth:
                spec = speculation
                self.runner.spec_graphs.warm(depth, spec.draft_depth, spec.tokens)

    def _run(self) -> None:
        # OpenMP's thread count is per OS thread: a count set in the thread that built the
        # engine does not reach this one, whose kernels would run on every core
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if self.runner.decoder is not None:
            configure_compiler()  # per-thread too
        while not self._stop:
            try:
                busy = self.step()
            except Exception as err:  # a bug must fail requests, not kill the server
                self._fail_all(f"engine error: {err!r}")
                busy = False
            if not busy:
                self._hand_over()
                self.wake.wait(timeout=0.5)
                self.wake.clear()
        self._hand_over()

    # Submission (any thread) ------------------------------------------------------------------
    def capacity_tokens(self, depth: int, policy: LoopSlotPolicy | None = None) -> int:
        """Most positions one depth-T sequence can ever hold in the cache (whichever of the two
        pools runs out first)."""
        cache = self.cache
        slots = (policy or cache.policy).num_slots(depth)
        return min(cache.num_outer_blocks, cache.num_rec_blocks // slots) * cache.block_size - 1

    def has_room(self, k: int = 1) -> bool:
        """Can k more sequences start or wait without exceeding the queue bound?"""
        sched = self.scheduler
        # every unfinished sequence not running waits, in the scheduler or not yet drained from
        # the inbox; a pending abort or stop in the inbox takes no room
        queued = self.pending - len(sched.running) + k
        free_slots = max(0, sched.config.max_batch - len(sched.running))
        return queued <= sched.config.max_queue + free_slots

    def submit(self, request: EngineRequest, emit: Callable[[StepOutput], None]) -> Sequence:
        if not self.has_room():
            raise QueueFull
        seq = Sequence(request, emit)
        with self._pending_lock:
            self.pending += 1
        self.inbox.put(("add", seq))
        self.wake.set()
        return seq

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End a sequence at the next step (client gone: "abort"; stop string seen: "stop")."""
        self.inbox.put((reason, seq))
        self.wake.set()

    def open(self, request: EngineRequest) -> tuple[Sequence, AsyncIterator[StepOutput]]:
        """Submit now (QueueFull is raised here, before any response starts) and return the
        sequence with an iterator over its outputs; leaving the iterator early aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        seq = self.submit(request, LoopSink(loop, outputs))
        return seq, self._outputs(seq, outputs)

    async def _outputs(
        self, seq: Sequence, outputs: asyncio.Queue[StepOutput]
    ) -> AsyncIterator[StepOutput]:
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:
                self.abort(seq)

    def generate_sync(self, request: EngineRequest, timeout: float = 120) -> list[StepOutput]:
        """Blocking helper for tests and benchmarks (the engine thread must be running)."""
        outputs: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
        self.submit(request, outputs.put)
        result, deadline = [], time.monotonic() + timeout
        while not result or result[-1].finish_reason is None:
            result.append(outputs.get(timeout=max(0.0, deadline - time.monotonic())))
        return result

    # The step (engine thread) ------------------------------------------------------------------
    def step(self) -> bool:
        self._drain_inbox()
        sched = self.scheduler
        for seq in sched.admit(self._namespace):
            if not seq.preemptions:  # a readmission after preemption is not queueing time
                self.metrics.queue_time.observe(seq.admitted_at - seq.arrival)
        work = sched.plan()
        # the last step's outputs leave as this step's compute starts (_hand_over says why)
        speculating = [w for w in work if w.speculate]
        if speculating:  # whole draft-verify rounds (one token or more each)
            self._hand_over()
            self._speculate(speculating)
        groups = [self._in_flight(w) for w in work if not w.speculate]
        keys = [self.runner.compiled_key(g) for g in groups]
        compiled = [(g, k) for g, k in zip(groups, keys, strict=True) if k is not None]
        if compiled:  # whole tokens in one graph call per (depth, slots), finished at once
            done = [g for g, _ in compiled]
            graph_keys = [k for _, k in compiled]
            self._finish(done, *self.runner.decode(done, graph_keys, before_graph=self._hand_over))
            self.metrics.batch.observe(len(done))
            self.metrics.compiled_tokens.inc(len(done))
        eager, prefilled = [], 0
        for g in (g for g, k in zip(groups, keys, strict=True) if k is None):
            if self.runner.can_prefill(g):  # a whole prefill chunk in one graph call
                self._hand_over()
                self._finish([g], self.runner.prefill(g))
                prefilled += len(g.positions)
            else:
                eager.append(g)
        self.metrics.compiled_prefill.inc(prefilled)
        if eager:
            self._hand_over()
            self.runner.prelude(eager)
            self.pool.extend(eager)
        self._observe_gauges()
        if not self.pool:  # whether there is more to do at once
            return bool(compiled or speculating or prefilled or (sched.waiting and sched.running))
        self._hand_over()
        done = self.runner.loop_until_coda(
            self.pool,
            self.config.coda_wait,
            lambda looping: self.metrics.batch.observe(sum(g.n_active for g in looping)),
        )
        self.pool = [g for g in self.pool if not g.done]
        self._finish(done, self.runner.coda(done))
        return True

    def _in_flight(self, w: Work) -> InFlight:
        device = self.runner.device
        ids = torch.tensor(w.seq.tokens[w.start : w.end], device=device)
        return InFlight(w.seq, torch.arange(w.start, w.end), ids, w.seq.request.loops.depth)

    def _finish(
        self,
        groups: list[InFlight],
        logits: torch.Tensor,
        greedy: list[tuple[int, float]] | None = None,
    ) -> None:
        """Account finished groups and sample the next token of those at their sequence's end.
        `greedy`: per group, its last row's argmax and logprob (from a decode graph)."""
        rows, to_sample, picks, offset = [], [], [], 0
        for gi, g in enumerate(groups):
            n = len(g.positions)
            seq, end = g.seq, int(g.positions[-1]) + 1
            seq.in_flight, seq.computed = False, end
            used = g.loops_used.tolist()
            seq.total_loops += sum(used)
            seq.positions_run += n
            self._account(used, g.exits)
            if seq.request.loops.warm_start:
                seq.last_h = g.h[-1:].clone()
            if end <= seq.num_prompt:
                seq.prompt_depths += used
                self._score_prompt(seq, logits[offset : offset + n], int(g.positions[0]))
                prompt = seq.tokens[: seq.num_prompt]
                self.cache.publish_prefix(seq.table, prompt, end, seq.prompt_depths)
            if end >= seq.num_prompt:  # the prompt is done: keep only the policy's slots
                self.cache.finish_prefill(seq.table)
            if end == len(seq.tokens) and not seq.finished:
                if seq.request.sampling.max_tokens == 0:
                    self._complete(seq, StepOutput(finish_reason="length"))
                else:
                    rows.append(logits[offset + n - 1])
                    to_sample.append((seq, used[-1]))
                    picks.append(greedy[gi] if greedy else None)
            offset += n
        if to_sample:
            self._emit_samples(rows, to_sample, picks)

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        k = seq.request.sampling.prompt_logprobs
        if k is None:
            return
        targets = seq.tokens[start + 1 : start + 1 + len(logits)]
        if targets:
            logprobs = torch.log_softmax(logits[: len(targets)], -1)
            seq.prompt_scores += prompt_scores(logprobs, targets, k)

    def _row(self, seq: Sequence, output: list[int]) -> SampleRow:
        """What sampling needs of `seq` with `output` generated so far."""
        p = seq.request.sampling
        banned = []
        if len(output) < p.min_tokens:
            banned = banned_before_min_tokens(p.stop_token_ids, self.config.eos_id, p.ignore_eos)
        return SampleRow(p, seq.sample_gen, seq.tokens[: seq.num_prompt], output, banned)

    def _emit_samples(
        self,
        logits: list[torch.Tensor],
        items: list[tuple[Sequence, int]],
        picks: list[tuple[int, float] | None],
    ) -> None:
        """Sample and send one token per item from its logits row (V,); `picks`: the row's
        argmax and logprob where a graph computed them, which plain greedy rows that report
        no alternatives take as they are."""
        rows = [self._row(seq, seq.output) for seq, _ in items]
        now = time.monotonic()
        if all(p is not None and plain_greedy(r) and not r.params.logprobs
               for p, r in zip(picks, rows, strict=True)):  # fmt: skip
            sampled = [Sampled(tok, logprob, []) for tok, logprob in picks]
        else:
            sampled = self._sample(torch.stack(logits), rows)
        for (seq, depth), s in zip(items, sampled, strict=True):
            if isinstance(s, str):
                self._complete(seq, StepOutput(finish_reason="error", error=s))
            else:
                self._take(seq, s, depth, now)
        self.metrics.generation_tokens.inc(len(items))

    def _take(self, seq: Sequence, s: Sampled, depth: int, now: float) -> bool:
        """Append a sampled token and send it; True when it ended the sequence."""
        p, eos = seq.request.sampling, self.config.eos_id
        seq.tokens.append(s.token)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        seq.last_token_at = now
        reason = None
        if (s.token == eos and not p.ignore_eos) or s.token in p.stop_token_ids:
            reason = "stop"
        elif (
            len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.config.scheduler.max_context
        ):
            reason = "length"
        out = StepOutput(s.token, s.logprob, s.top, depth, finish_reason=reason)
        if len(seq.output) == 1 and p.prompt_logprobs is not None:
            out.prompt_scores, out.prompt_depths = seq.prompt_scores, seq.prompt_depths
        if reason:
            self._complete(seq, out)
        else:
            self._send(seq, out)
        return reason is not None

    def _speculate(self, work: list[Work]) -> None:
        """Self-speculative rounds: each sequence gets the tokens its round verified (at its
        depth, counted as if decoded plainly), up to the first that ends it."""
        try:
            proposals = self.speculator.round([w.seq for w in work], [w.speculate for w in work])
        except Exception as err:  # fail these sequences, not the server
            for w in work:
                w.seq.in_flight = False
                self._complete(w.seq, StepOutput(finish_reason="error", error=repr(err)))
            return
        now, emitted = time.monotonic(), 0
        for prop in proposals:
            seq, depth = prop.seq, prop.seq.request.loops.depth
            seq.draft_tokens += prop.drafted
            seq.accepted_tokens += prop.accepted
            self.metrics.draft_tokens.inc(prop.drafted)
            self.metrics.accepted_tokens.inc(prop.accepted)
            for s in prop.tokens:
                seq.total_loops += depth
                seq.positions_run += 1
                self._account([depth], 0)
                emitted += 1
                if self._take(seq, s, depth, now):
                    break
        self.metrics.generation_tokens.inc(emitted)
        self._spec_totals[0] += sum(p.drafted for p in proposals)
        self._spec_totals[1] += sum(p.accepted for p in proposals)
        self.metrics.acceptance_rate.set(self._spec_totals[1] / max(1, self._spec_totals[0]))

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[SampleRow]) -> list[Sampled | str]:
        """Batched sampling; if it fails, row by row, so one bad row fails only its sequence."""
        try:
            return list(sample(logits, rows))
        except Exception:
            out: list[Sampled | str] = []
            for i, row in enumerate(rows):
                try:
                    out.append(sample(logits[i : i + 1], [row])[0])
                except Exception as err:
                    out.append(f"sampling failed: {err!r}")
            return out

    def _account(self, loops: list[int], exits: int) -> None:
        self.metrics.loops.inc(sum(loops))
        for depth in loops:
            self.metrics.depth.observe(depth)
        if exits:
            self.metrics.early_exits.inc(exits)

    def _complete(self, seq: Sequence, out: StepOutput) -> None:
        scoring = seq.request.sampling.prompt_logprobs is not None
        if scoring and out.prompt_scores is None and not seq.output:  # not sent with a token yet
            out.prompt_scores, out.prompt_depths = seq.prompt_scores, seq.prompt_depths
        seq.finished = True
        self.scheduler.retire(seq)
        with self._pending_lock:
            self.pending -= 1
        self.metrics.finished(out.finish_reason)
        self.metrics.e2e.observe(time.monotonic() - seq.arrival)
        if seq.first_token_at is not None and len(seq.output) > 1:
            tpot = (seq.last_token_at - seq.first_token_at) / (len(seq.output) - 1)
            self.metrics.tpot.observe(tpot)
        self._send(seq, out)

    def _send(self, seq: Sequence, out: StepOutput) -> None:
        """Queue `out` for its reader; it leaves at the next hand-over. An engine stepped by
        hand (not started, or stopped) has no hand-over to wait for: `out` goes at once, so a
        caller that steps until its output arrives sees it after the step that made it."""
        out.total_loops, out.positions = seq.total_loops, seq.positions_run
        out.draft_tokens, out.accepted_tokens = seq.draft_tokens, seq.accepted_tokens
        if self._relay is None:
            deliver([(seq.emit, out)])
        else:
            self._outbox.append((seq.emit, out))

    def _hand_over(self) -> None:
        """Send the queued outputs to their readers through the relay thread. Called just
        before the next compute (the decode graph's call, where it releases the GIL) or before
        the engine idles: the readers' event loop then formats the tokens while the graph runs
        instead of taking the GIL from the engine's Python before it (relay.py; one stream over
        HTTP, reference shape, interleaved servers: 241 tok/s handing over from this thread as
        each token was sampled, 252 at the start of the next step, 271 just before the graph
        call)."""
        if not self._outbox:
            return
        batch, self._outbox, relay = self._outbox, [], self._relay
        if relay is None:  # stopped while this thread was still stepping (join timed out)
            deliver(batch)
        else:
            relay.send(batch)

    # Inbox, aborts, gauges -----------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while not self.inbox.empty():
            kind, seq = self.inbox.get_nowait()
            if kind == "add":
                self.metrics.prompt_tokens.inc(seq.num_prompt)
                self.scheduler.waiting.append(seq)
            elif not seq.finished:
                self.pool = [g for g in self.pool if g.seq is not seq]
                seq.in_flight = False
                self._complete(seq, StepOutput(finish_reason=kind))

    def _fail_all(self, message: str) -> None:
        self.pool = []
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            seq.in_flight = False
            self._complete(seq, StepOutput(finish_reason="error", error=message))

    def _namespace(self, seq: Sequence) -> bytes:
        """Prefix blocks are shared only between requests whose K/V would be identical. They
        hold every loop's K/V, so requests under any policy share them."""
        loops = seq.request.loops
        noisy = self.model.cfg.state_init != "zero"
        key = f"{loops.depth}|{loops.exit}|{loops.warm_start}|"
        key += f"{seq.noise_seed}" if noisy else "-"
        return hashlib.sha256(key.encode()).digest()

    def _observe_gauges(self) -> None:
        m, s, c = self.metrics, self.scheduler, self.cache
        m.running.set(len(s.running))
        m.waiting.set(len(s.waiting))
        used = c.used_bytes
        m.kv_bytes.set(used)
        m.kv_usage.set(used / c.capacity_bytes)
        seen = (c.prefix_queries, c.prefix_hits, s.preemptions)
        m.prefix_queries.inc(seen[0] - self._counted[0])
        m.prefix_hits.inc(seen[1] - self._counted[1])
        m.preemptions.inc(seen[2] - self._counted[2])
        self._counted = seen
