"""Admission, chunked prefill, cache growth and preemption: which tokens start this step."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from parcae_serve.server.engine.kv_cache import BlockTable, KVCache
from parcae_serve.server.engine.sequence import Sequence


@dataclass
class SchedulerConfig:
    max_batch: int = 64  # sequences computed at once
    max_queue: int = 256  # sequences waiting for admission before 429
    prefill_chunk: int = 256  # prompt tokens started per step (keeps running streams moving)
    max_context: int = 2048
    # speculate only while at most this many sequences run: measured on the built-in model
    # (bench/RESULTS.md), one stream gains 1.22x and two already lose 6%
    speculative_max_batch: int = 1


@dataclass
class Work:
    seq: Sequence
    start: int
    end: int  # positions [start, end) go through the model
    speculate: int = 0  # > 0: a self-speculative round drafting this many tokens (one decode)


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache) -> None:
        self.config, self.cache = config, cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def admit(self, namespace_of) -> list[Sequence]:
        """Start waiting sequences (FIFO) while batch slots and cache memory allow."""
        admitted = []
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            table, hit, queried = self._table(seq, namespace_of(seq))
            if not self.cache.ensure(table, len(seq.tokens) + 1):
                self.cache.free(table)
                break
            # in tokens, as vLLM counts them: prompt tokens looked up, and found
            self.cache.prefix_queries += len(seq.tokens) if queried else 0
            self.cache.prefix_hits += hit
            self.waiting.popleft()
            if seq.swapped is not None:  # resumes exactly where it was preempted
                self.cache.swap_in(table, seq.swapped)
                hit, seq.swapped = seq.swapped.positions, None
            elif hit:  # cached positions count in usage as in a cold run
                seq.cached_tokens = hit
                seq.prompt_depths = self.cache.cached_loops(table, hit)
                seq.total_loops, seq.positions_run = sum(seq.prompt_depths), hit
            seq.table, seq.computed = table, hit
            seq.admitted_at = seq.admitted_at or time.monotonic()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _table(self, seq: Sequence, namespace: bytes) -> tuple[BlockTable, int, bool]:
        """A new sequence's table (every loop kept while its prompt prefills, prefix blocks
        attached), how many positions are already computed, and whether the prefix cache was
        asked."""
        loops, cache = seq.request.loops, self.cache
        if seq.swapped is not None:
            prefilling = seq.swapped.prefilling
            return cache.new_table(loops.depth, namespace, loops.kv_policy, prefilling), 0, False
        # a prompt too long for every loop's K/V in the whole pool prefills in the policy's
        # layout, in one chunk (loop t then sees every position's loop t): exact, not reusable
        prefilling = cache.could_hold(len(seq.tokens) + 1, loops.depth)
        table = cache.new_table(loops.depth, namespace, loops.kv_policy, prefilling)
        if seq.request.sampling.prompt_logprobs is not None or not table.exact:
            return table, 0, False
        return table, cache.attach_prefix(table, seq.tokens), True

    def plan(self) -> list[Work]:
        """The groups to start now: a prefill chunk or the next decode token per idle sequence."""
        work, budget = [], self.config.prefill_chunk
        for seq in list(self.running):
            if seq.in_flight or seq.finished or seq not in self.running:
                continue
            start = seq.computed
            remaining = len(seq.tokens) - start
            if remaining > 1:
                if budget <= 0:
                    continue
                # a table in a lossy layout prefills in one chunk (see _table)
                take = min(remaining, budget) if seq.table.exact else remaining
                end, budget = start + take, budget - take
            else:
                end = start + 1
            if not self._grow(seq, end + 1):
                continue
            seq.in_flight = True
            work.append(Work(seq, start, end, self._drafts(seq) if remaining == 1 else 0))
        work.sort(key=lambda w: w.end - w.start > 1)  # decode tokens first: one batched SDPA
        return work

    def _drafts(self, seq: Sequence) -> int:
        """How many tokens a decode step of `seq` drafts: 0 (plain decoding) without speculation,
        for a greedy row under load (batching already fills the machine), with fewer than 2
        tokens left to generate, or when the cache has no free room for the drafts (never
        preempts for them)."""
        spec = seq.request.loops.speculative
        if spec is None:
            return 0
        # greedy output is the same either way; a sampled one is not (the random draws are
        # spent differently), so a seeded request keeps speculating whatever else runs
        sampled = not seq.request.sampling.greedy
        if len(self.running) > self.config.speculative_max_batch and not sampled:
            return 0
        left = min(
            seq.request.sampling.max_tokens - len(seq.output),
            self.config.max_context - len(seq.tokens),
        )
        k = min(spec.tokens, left)
        return k if k >= 2 and self.cache.ensure(seq.table, len(seq.tokens) + k) else 0

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Make room for `tokens` positions, preempting the youngest idle sequences if needed."""
        while not self.cache.ensure(seq.table, tokens):
            victims = [s for s in self.running if s is not seq and not s.in_flight]
            if not victims:
                if not any(s.in_flight for s in self.running):
                    self.preempt(seq)  # alone and still short: start again when memory frees
                return False
            self.preempt(max(victims, key=lambda s: s.arrival))
        return True

    def preempt(self, seq: Sequence) -> None:
        """Swap a sequence's K/V to host memory, free its blocks and queue it again; it resumes
        from the swapped cache, so its output is what it would have been without preemption."""
        seq.swapped = self.cache.swap_out(seq.table, seq.computed)
        self.cache.free(seq.table)
        seq.table, seq.in_flight = None, False
        seq.preemptions += 1
        self.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def retire(self, seq: Sequence) -> None:
        if seq.table is not None:
            self.cache.free(seq.table)
            seq.table = None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
